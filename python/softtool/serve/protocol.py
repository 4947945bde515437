"""The HTTP API's request and response shapes: pydantic models that mirror OpenAI's completions API.

Validation lives here: a request that does not fit `CompletionRequest` (a wrong type, a missing prompt, an
unknown field, a value out of range, an option softtool does not implement) is answered 400 with an
`ErrorResponse`, built by the app from pydantic's error, never by hand-written checks in the routes.

softtool's additions, passed by the openai client as `extra_body`: `fields` (the other fields of a template
with several, e.g. {"context": "..."} while the prompt fills {question}), `top_k`, `repetition_penalty`,
`min_tokens` and `return_token_ids` (each choice's generated token ids, the EOS included when it stopped on it, as
vLLM names it: what to compare across engines, since text depends on the detokenizer).

A prompt is a string, a list of strings, a list of token ids, or a list of such lists (OpenAI's four forms);
`logprobs: k` (0 to MAX_LOGPROBS) and `echo` answer with `CompletionLogprobs`, OpenAI's legacy shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from softtool.runtime.logprobs import MAX_LOGPROBS

Number = StrictInt | StrictFloat  # JSON numbers; "0.5" as a string is refused
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]  # checked against V in the service


class Unsupported(ValueError):
    """A field softtool accepts only at its neutral value (suffix, the penalties, logit_bias, best_of != n)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. Every field of OpenAI's API is known; those softtool cannot honour are refused
    unless left at their neutral value, and unknown fields are refused (a typo is not silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr  # a task, or TASK:prefix (its virtual tokens, then the prompt as it is)
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    n: StrictInt = Field(default=1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    user: StrictStr | None = None
    echo: StrictBool | None = None
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # OpenAI fields softtool does not implement: accepted at their neutral value only.
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[StrictStr, Number] | None = None
    # softtool's own (extra_body in the openai client)
    fields: dict[StrictStr, StrictStr] | None = None
    top_k: StrictInt | None = Field(default=None, ge=0)
    repetition_penalty: Number | None = Field(default=None, gt=0)
    min_tokens: StrictInt | None = Field(default=None, ge=0)
    return_token_ids: StrictBool = False  # each choice's generated token ids too (vLLM's field of the same name)

    @model_validator(mode="after")
    def _neutral_only(self) -> CompletionRequest:
        refused = {
            "best_of": self.best_of not in (None, self.n),
            "suffix": bool(self.suffix),
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
            "logit_bias": bool(self.logit_bias),
        }
        names = [name for name, bad in refused.items() if bad]
        if names:
            raise Unsupported(f"softtool does not support {', '.join(names)} (leave it unset)")
        if isinstance(self.stop, list) and any(s == "" for s in self.stop) or self.stop == "":
            raise ValueError("stop strings must not be empty")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy `logprobs` of a choice: per token its text, its log-prob (None for the first echoed prompt
    token, which has nothing before it), its top candidates {text: log-prob}, and where it starts in the choice's
    text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    token_ids: list[int] | None = None  # with return_token_ids: the generated ids (in a stream: this chunk's)


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionStreamResponse(BaseModel):
    """One server-sent event of a streamed completion (the same `object` as OpenAI's chunks)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "softtool"
    root: str | None = None  # the folder the task was loaded from


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# HTTP status -> OpenAI's error type (what its clients show)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=ERROR_TYPES.get(status, "server_error"), param=param, code=code)
    return ErrorResponse(error=info).model_dump()
