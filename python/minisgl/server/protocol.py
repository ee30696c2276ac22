"""Pydantic request schemas of the HTTP API (OpenAI-compatible routes and native /generate).

Validation is strict: unknown top-level fields, wrong types (no string-to-number coercion),
NaN/Infinity and out-of-range values are rejected with a 400 before anything reaches a worker.
Checks that need the model happen later: the vocabulary in `to_sampling_params` and the API
handler (token-id prompts), the context length in the tokenizer worker.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from minisgl.core import SamplingParams

from .generation import ApiError
from .sampling import MAX_TOP_LOGPROBS, SamplingChecks, StrictModel, engine_params
from .tools import grammar_for

# ranges only: every model is strict already (StrictModel, or strict=True)
Penalty = Annotated[float, Field(ge=-2, le=2)]
RepPenalty = Annotated[float, Field(gt=0, le=2)]
Prob = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]  # a JSON key: a string
Bias = Annotated[float, Field(ge=-100, le=100)]


class JsonSchemaFormat(StrictModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with (and only with) type 'json_schema'")
        return self


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(SamplingChecks):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    user: str | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepPenalty | None = None
    min_p: Prob | None = None
    min_tokens: Count = 0
    logit_bias: dict[TokenId, Bias] | None = Field(default=None, max_length=1024)
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    # accepted, changing nothing (docs/server.md says why)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # SGLang's router sends these: accepted only with the value this server implements
    no_stop_trim: Literal[False] = False
    skip_special_tokens: Literal[True] = True
    return_hidden_states: Literal[False] = False

    @model_validator(mode="after")
    def _stream_options(self) -> Any:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def _openai_choices(
        self, vocab: int, max_n: int, logprobs: int | None, chat: bool
    ) -> list[SamplingParams]:
        bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        return engine_params(
            self, vocab, max_n, self.seed, max_tokens=self.token_limit, logprobs=logprobs,
            presence_penalty=self.presence_penalty or 0.0, min_p=self.min_p or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, logit_bias=bias or None,
            repetition_penalty=self.repetition_penalty or 1.0, min_tokens=self.min_tokens,
            grammar=grammar_for(self, chat),
        )  # fmt: skip


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be empty")
            if any(isinstance(p, list) and not p for p in v):
                raise ValueError("token-id prompts must not be empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported (only best_of == n)")
        return self

    def to_sampling_params(self, vocab: int, max_n: int) -> list[SamplingParams]:
        """One per choice (n); every prompt gets them all."""
        return self._openai_choices(vocab, max_n, self.logprobs, False)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def render(self) -> dict[str, Any]:
        c = self.content
        if isinstance(c, list):
            if any(p.type != "text" for p in c):
                raise ApiError(400, "only text content parts are supported", "messages")
            c = "".join(p.text or "" for p in c)
        msg: dict[str, Any] = {"role": self.role, "content": c if c is not None else ""}
        extra = {k: getattr(self, k) for k in ("name", "tool_calls", "tool_call_id")}
        return msg | {k: v for k, v in extra.items() if v is not None}


class Function(StrictModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: Function


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: Function  # its name


class _ChatInput(StrictModel):
    """What the tokenizer worker's chat template renders (chat completions and /tokenize)."""

    messages: Any = None
    add_generation_prompt: bool = True
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
        """The worker's JSON payload."""
        tools = [t.model_dump(exclude_none=True) for t in self.tools or []] or None
        return json.dumps({"messages": [m.render() for m in self.messages], "tools": tools,
                           "add_generation_prompt": self.add_generation_prompt,
                           "kwargs": self.chat_template_kwargs or {}})  # fmt: skip


class ChatCompletionRequest(_Sampling, _ChatInput):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    continue_final_message: Literal[False] = False
    # SGLang's: accepted at the behaviour implemented (--reasoning-parser splits, streamed too)
    separate_reasoning: Literal[True] = True
    stream_reasoning: Literal[True] = True
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_sampling_params(self, vocab: int, max_n: int) -> list[SamplingParams]:
        """One per choice (n)."""
        top = self.top_logprobs or 0
        return self._openai_choices(vocab, max_n, top if self.logprobs else None, True)

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


class NativeSamplingParams(SamplingChecks):
    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    sampling_seed: int | None = None  # SGLang's name (the only one sglang-router forwards)
    n: int = 1


class GenerateRequest(StrictModel):
    text: str | None = None
    input_ids: list[int] | None = None
    model: str | None = None
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = True  # SGLang's default is False: text, or None, per entry
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

    @property
    def token_limit(self) -> int | None:
        return self.sampling_params.max_new_tokens

    def to_sampling_params(self, vocab: int, max_n: int) -> list[SamplingParams]:
        """One per choice (sampling_params.n)."""
        sp = self.sampling_params
        if None not in (sp.seed, sp.sampling_seed) and sp.seed != sp.sampling_seed:
            raise ApiError(400, "seed and sampling_seed differ", "sampling_params.seed")
        seed = sp.sampling_seed if sp.seed is None else sp.seed
        logprobs = self.top_logprobs_num if self.return_logprob else None
        return engine_params(sp, vocab, max_n, seed, max_tokens=self.token_limit, logprobs=logprobs)


class TokenizeRequest(_ChatInput):
    """vLLM's /tokenize: a text `prompt`, or chat `messages` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]
