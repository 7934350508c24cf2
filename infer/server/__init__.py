"""The HTTP server (`infer.serve` is its command line): `schemas` (request bodies, errors), `core` (`Server`:
validation into engine options, submission, the chat plan, response pieces), `http` (body parsing, waiting for
choices, the API-key and counting middleware), `routes_chat`, `routes_completions`, `routes_admin` (health, metrics,
models, adapters, tokenizer endpoints), `metrics` (Prometheus text), `app` (`build_app`, `Running`); and the engine
run in lockstep on every process of a multi-host server (`lockstep`).

Import direction (tests/test_imports.py, `INFER_ORDER`): imports `infer.engine`, `infer.chat`, `infer.structured`
and `small4_jax`; only `infer.serve` imports it.
"""
