"""The HTTP API's request bodies (pydantic, strict: any field not listed is a 400 naming it) and its errors."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infer.chat import CLIENT_EFFORTS

MAX_N = 16  # choices per request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    include_usage: bool = False


class LoadLoRA(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_path: str


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tokens: list[int]
    model: str | None = None


class UnloadLoRA(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str


class CommonRequest(BaseModel):
    """Fields every endpoint takes. Every field a client may send is listed: any other is a 400 naming it (`parse`),
    never silently ignored."""

    # strict: `"temperature": "0.5"` is a 400 naming the field, not silently a number
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    # every sampling field is range-checked here (a 400 naming it), never first in the engine's step, where an
    # overflow would fail the whole batch: seeds are uint32, top_k int32 (values past the vocabulary turn it off)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, le=2**31 - 1)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    random_seed: int | None = Field(None, ge=0, le=2**32 - 1)  # Mistral's API's name for `seed`
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, le=100, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the operator's logs; it changes nothing
    cache_salt: str | None = None  # a tenant's prefix-cache salt: requests share cached pages only with the same salt


class ChatRequest(CommonRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | any (Mistral's required) | named
    # OpenAI's none/minimal/low/medium/high, Mistral's xhigh/max, and auto: mapped onto the model's values by the
    # server's ReasoningPolicy (infer/chat.py)
    reasoning_effort: Literal[CLIENT_EFFORTS] | None = None
    reasoning: dict[str, Any] | None = None  # {"effort": ...}: the same, as some OpenAI-compatible clients send it
    prompt_mode: Literal["reasoning"] | None = None  # Mistral's API: "reasoning" asks for the reasoning mode
    safe_prompt: bool = False  # Mistral's API: true is a 400 (no safety prompt is served)
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # default: true, but a named tool_choice gives exactly one call
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(CommonRequest):
    # OpenAI's prompt shapes: a string, strings, token ids, lists of token ids (one set of n choices per prompt)
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(message: str, kind: str, param: str | None = None, code: int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
