"""Pydantic request schemas of the HTTP API (OpenAI-compatible routes and native /generate).

Validation is strict: unknown top-level fields, wrong types (no string-to-number coercion),
NaN/Infinity and out-of-range values are rejected with a 400 before anything reaches a worker.
Checks that need the model (context length, vocabulary size) happen later, in the API handler
(token-id prompts) or in the tokenizer worker (text prompts).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

SInt = Annotated[int, Strict()]
SFloat = Annotated[float, Strict()]
SBool = Annotated[bool, Strict()]
SStr = Annotated[str, Strict()]
Penalty = Annotated[float, Strict(), Field(ge=-2, le=2)]
RepPenalty = Annotated[float, Strict(), Field(gt=0, le=2)]
Prob = Annotated[float, Strict(), Field(ge=0, le=1)]
Count = Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)]
TokenId = Annotated[str, Strict(), Field(pattern=r"^[0-9]{1,10}$")]  # a JSON key: a string
Bias = Annotated[float, Strict(), Field(ge=-100, le=100)]

MAX_INT = 2**31 - 1  # token counts, top_k: anything larger is nonsense and kept off msgpack
MAX_STOP = 16  # stop strings per request
MAX_STOP_LEN = 1024
MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class JsonSchemaFormat(_Strict):
    name: SStr = "response"
    description: SStr | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: SBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with (and only with) type 'json_schema'")
        return self


class StreamOptions(_Strict):
    include_usage: SBool = False
    continuous_usage_stats: SBool = False


def _positive(cls: Any, v: int | None) -> int | None:
    if v is not None and not 1 <= v <= MAX_INT:
        raise ValueError(f"must be an integer in [1, {MAX_INT}], got {v}")
    return v


def _temperature(cls: Any, v: float | None) -> float | None:
    if v is not None and not 0 <= v <= 100:
        raise ValueError(f"must be in [0, 100], got {v}")
    return v


def _top_p(cls: Any, v: float | None) -> float | None:
    if v is not None and not 0 < v <= 1:
        raise ValueError(f"must be in (0, 1], got {v}")
    return v


def _top_k(cls: Any, v: int | None) -> int | None:
    if v is not None and not (v in (-1, 0) or 1 <= v <= MAX_INT):
        raise ValueError(f"must be -1 or 0 (disabled) or a positive integer, got {v}")
    return v


def _n(cls: Any, v: int) -> int:
    if v < 1:
        raise ValueError(f"must be >= 1, got {v}")
    return v


def _stop(cls: Any, v: str | list[str] | None) -> list[str]:
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences")
    if any(not s or len(s) > MAX_STOP_LEN for s in stops):
        raise ValueError(f"stop sequences must be non-empty and at most {MAX_STOP_LEN} chars")
    return stops


def _stop_ids(cls: Any, v: list[int] | None) -> list[int] | None:
    if v is not None and (len(v) > 1024 or any(not 0 <= i <= MAX_INT for i in v)):
        raise ValueError("must be at most 1024 non-negative token ids")
    return v


def _seed(cls: Any, v: int | None) -> int | None:
    if v is not None and not -(2**63) <= v < 2**63:
        raise ValueError("must fit in a signed 64-bit integer")
    return v


def _top_logprobs(cls: Any, v: int | None) -> int | None:
    if v is not None and not 0 <= v <= MAX_TOP_LOGPROBS:
        raise ValueError(f"must be in [0, {MAX_TOP_LOGPROBS}]")
    return v


class _SamplingChecks(_Strict):
    """Validators of the sampling fields every request schema has (the fields and their
    defaults are declared by each schema)."""

    _v_temperature = field_validator("temperature", check_fields=False)(_temperature)
    _v_top_p = field_validator("top_p", check_fields=False)(_top_p)
    _v_top_k = field_validator("top_k", check_fields=False)(_top_k)
    _v_n = field_validator("n", check_fields=False)(_n)
    _v_stop = field_validator("stop", check_fields=False)(_stop)
    _v_stop_ids = field_validator("stop_token_ids", check_fields=False)(_stop_ids)
    _v_seed = field_validator("seed", check_fields=False)(_seed)


class _Sampling(_SamplingChecks):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: SStr | None = None
    max_tokens: SInt | None = None
    temperature: SFloat | None = None
    top_p: SFloat | None = None
    top_k: SInt | None = None
    n: SInt = 1
    stream: SBool = False
    stream_options: StreamOptions | None = None
    stop: SStr | list[SStr] | None = None
    stop_token_ids: list[SInt] | None = None
    ignore_eos: SBool = False
    seed: SInt | None = None
    user: SStr | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepPenalty | None = None
    min_p: Prob | None = None
    min_tokens: Count = 0
    logit_bias: dict[TokenId, Bias] | None = Field(default=None, max_length=1024)
    response_format: ResponseFormat | None = None
    guided_json: SStr | dict[str, Any] | None = None
    guided_regex: SStr | None = None
    guided_choice: list[SStr] | None = Field(default=None, min_length=1)
    # accepted, changing nothing (docs/server.md says why)
    store: SBool | None = None
    metadata: dict[SStr, SStr] | None = None
    service_tier: SStr | None = None
    # SGLang's router sends these: accepted only with the value this server implements
    no_stop_trim: Literal[False] = False
    skip_special_tokens: Literal[True] = True
    return_hidden_states: Literal[False] = False

    _v_max_tokens = field_validator("max_tokens")(_positive)

    @model_validator(mode="after")
    def _stream_options(self) -> Any:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


class CompletionRequest(_Sampling):
    prompt: SStr | list[SStr] | list[SInt] | list[list[SInt]]
    logprobs: SInt | None = None
    echo: SBool = False
    suffix: SStr | None = None
    best_of: SInt | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be empty")
            if any(isinstance(p, list) and not p for p in v):
                raise ValueError("token-id prompts must not be empty")
        return v

    _v_logprobs = field_validator("logprobs")(_top_logprobs)

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported (only best_of == n)")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: SStr
    text: SStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: SStr
    content: SStr | list[ContentPart] | None = None
    name: SStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: SStr | None = None

    def render(self) -> dict[str, Any]:
        c = self.content
        if isinstance(c, list):
            if any(p.type != "text" for p in c):
                raise ValueError("only text content parts are supported")
            c = "".join(p.text or "" for p in c)
        msg: dict[str, Any] = {"role": self.role, "content": c if c is not None else ""}
        for k in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, k) is not None:
                msg[k] = getattr(self, k)
        return msg


class Function(_Strict):
    name: SStr = Field(min_length=1, max_length=64)
    description: SStr | None = None
    parameters: dict[str, Any] | None = None
    strict: SBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: Function


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: Function  # its name


class _ChatInput(_Strict):
    """What the tokenizer worker's chat template renders (chat completions and /tokenize)."""

    messages: Any = None
    add_generation_prompt: SBool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        reserved = {"messages", "tools", "add_generation_prompt", "tokenize", "chat_template"}
        if set(v or {}) & reserved:
            raise ValueError(f"cannot set {sorted(reserved)}")
        return v

    def payload(self) -> str:
        """The worker's JSON payload (ValueError: a message it cannot render)."""
        tools = [t.model_dump(exclude_none=True) for t in self.tools or []] or None
        return json.dumps({"messages": [m.render() for m in self.messages], "tools": tools,
                           "add_generation_prompt": self.add_generation_prompt,
                           "kwargs": self.chat_template_kwargs or {}})  # fmt: skip


class ChatCompletionRequest(_Sampling, _ChatInput):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: SInt | None = None
    logprobs: SBool = False
    top_logprobs: SInt | None = None
    add_generation_prompt: SBool = True
    continue_final_message: Literal[False] = False
    # SGLang's: accepted at the behaviour implemented (--reasoning-parser splits, streamed too)
    separate_reasoning: Literal[True] = True
    stream_reasoning: Literal[True] = True
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: SBool = True

    _v_max_completion_tokens = field_validator("max_completion_tokens")(_positive)
    _v_top_logprobs = field_validator("top_logprobs")(_top_logprobs)

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in [t.function.name for t in self.tools or []]:
                raise ValueError(f"tool_choice names {name!r}, which is not in tools")
        return self


class NativeSamplingParams(_SamplingChecks):
    max_new_tokens: SInt | None = None
    temperature: SFloat = 1.0
    top_p: SFloat = 1.0
    top_k: SInt = -1
    stop: SStr | list[SStr] | None = None
    stop_token_ids: list[SInt] | None = None
    ignore_eos: SBool = False
    seed: SInt | None = None
    sampling_seed: SInt | None = None  # SGLang's name (the only one sglang-router forwards)
    n: SInt = 1

    _v_max_tokens = field_validator("max_new_tokens")(_positive)
    _v_sampling_seed = field_validator("sampling_seed")(_seed)


class GenerateRequest(_Strict):
    text: SStr | None = None
    input_ids: list[SInt] | None = None
    model: SStr | None = None
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)
    stream: SBool = False
    return_logprob: SBool = False
    top_logprobs_num: SInt = 0
    return_text_in_logprobs: SBool = True  # SGLang's default is False: text, or None, per entry
    log_metrics: Literal[True] = True  # and the other SGLang fields sglang-router writes
    return_hidden_states: Literal[False] = False
    return_entropy: Literal[False] = False
    return_bytes: Literal[False] = False
    background: Literal[False] = False
    no_logs: Literal[False] = False

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'text' or 'input_ids'")
        if self.input_ids is not None and not self.input_ids:
            raise ValueError("input_ids must not be empty")
        if not 0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}]")
        return self


class TokenizeRequest(_ChatInput):
    """vLLM's /tokenize: a text `prompt`, or chat `messages` rendered by the chat template."""

    model: SStr | None = None
    prompt: SStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: SBool = True
    return_token_strs: SBool = False

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(_Strict):
    model: SStr | None = None
    tokens: list[SInt]
