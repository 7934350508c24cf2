"""The FastAPI application (`build_app`: the routes of `routes_*` behind `http.AuthAndCount`) and `Running`, a server
on a background thread (tests, embedding)."""

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from infer.server import routes_admin, routes_chat, routes_completions
from infer.server.core import Server
from infer.server.http import AuthAndCount
from infer.server.schemas import HTTPError, error_body


def build_app(server: Server) -> FastAPI:
    """The FastAPI application for `server`."""
    app = FastAPI(title="small4-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AuthAndCount, server=server)

    @app.exception_handler(HTTPError)
    async def http_error(_request, e: HTTPError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.status), status_code=e.status)

    routes_admin.register(app, server)
    routes_chat.register(app, server)
    routes_completions.register(app, server)
    return app


class Running:
    """A server running on a background thread (for tests and embedding): `.url`, `.stop()`."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0):
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.server = server
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(build_app(server), host=host, port=port, log_level="warning", lifespan="off")
        self._uvicorn = uvicorn.Server(config)
        server.engine.start()
        self._thread = threading.Thread(target=self._uvicorn.run, name="small4-http", daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._uvicorn.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)
        self.server.engine.stop()
