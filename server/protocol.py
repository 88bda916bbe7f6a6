"""Pydantic models of the OpenAI completions / chat completions API (plus vLLM's sampling extras)."""

from __future__ import annotations

import time
import uuid
from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

from leapserve.decoding.errors import InvalidRequestError
from leapserve.decoding.sampling_params import SamplingParams
from leapserve.decoding.structured_output import StructuredOutputsParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _is_none(value: object) -> bool:
    return value is None


# ---------------------------------------------------------------- requests


def _lone_surrogate(value: object, path: str = "") -> str | None:
    """Where in a parsed JSON body a string holds a lone UTF-16 surrogate ("\\ud800"), which is no Unicode text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = _lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if where is not None:
            return where
    return None


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI's and vLLM's parameters leapserve does not implement (on an endpoint without a field of that name):
# refused with a 400 that names them unless given a value that asks for nothing (the neutral values listed)
NOT_SUPPORTED: dict[str, tuple] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "prompt_logprobs": (None,),
    "use_beam_search": (None, False),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
}


class _Request(BaseModel):
    """A request body: a parameter this server does not know gets a 400 naming it, and so does text that is not
    Unicode (a lone UTF-16 surrogate, which JSON can carry)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: object) -> object:
        where = _lone_surrogate(data)
        if where is not None:
            raise InvalidRequestError(
                f"{where}: not valid Unicode text (it holds a lone UTF-16 surrogate)", where.split(".")[0]
            )
        return data


class JSONSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingRequest(_Request):
    """Fields shared by both generating endpoints; a parameter this server does not implement (`NOT_SUPPORTED`)
    gets a 400 naming it unless given a value that asks for nothing."""

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        unsupported = NOT_SUPPORTED.keys() - cls.model_fields.keys()  # an endpoint may implement some (echo)
        for name in unsupported & data.keys():
            if not any(data[name] == neutral for neutral in NOT_SUPPORTED[name]):
                raise InvalidRequestError(f"{name} is not supported by this server", name)
        return {k: v for k, v in data.items() if k not in unsupported}

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[int, float] | None = None  # token id (a JSON string) -> bias
    # OpenAI's with no effect on the output
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    vllm_xargs: dict[str, str | int | float | bool | None] | None = (
        None  # decoder arguments (SamplingParams.extra_args)
    )
    # structured outputs: OpenAI's response_format, or one of vLLM's
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """The one constraint the request gives (InvalidRequestError naming the fields when it gives several)."""
        given: list[StructuredOutputsParams] = []
        if self.response_format is not None and self.response_format.type != "text":
            fmt = self.response_format
            if fmt.type == "json_object":
                given.append(StructuredOutputsParams(json_object=True, param="response_format"))
            elif fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise InvalidRequestError("response_format: json_schema needs a schema", "response_format")
            else:
                given.append(StructuredOutputsParams(json=fmt.json_schema.schema_, param="response_format"))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            given.append(
                StructuredOutputsParams(
                    json=so.json_,
                    json_object=bool(so.json_object),
                    regex=so.regex,
                    choice=None if so.choice is None else tuple(so.choice),
                    grammar=so.grammar,
                    param="structured_outputs",
                )
            )
        for name, kwargs in (
            ("guided_json", {"json": self.guided_json}),
            ("guided_regex", {"regex": self.guided_regex}),
            ("guided_choice", {"choice": None if self.guided_choice is None else tuple(self.guided_choice)}),
            ("guided_grammar", {"grammar": self.guided_grammar}),
        ):
            if next(iter(kwargs.values())) is not None:
                given.append(StructuredOutputsParams(**kwargs, param=name))  # type: ignore[arg-type]
        if len(given) > 1:
            names = ", ".join(g.param for g in given)
            raise InvalidRequestError(f"give one structured-output constraint, not several ({names})", given[1].param)
        return given[0] if given else None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises InvalidRequestError (HTTP 400) for out-of-range values."""
        stop = self.stop or []  # None and "": no stop strings
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            seed=self.seed,
            stop=[stop] if isinstance(stop, str) else stop,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.logit_bias or {},
            min_p=self.min_p or 0.0,
            min_tokens=self.min_tokens,
            structured_outputs=self._structured_outputs(),
            extra_args=self.vllm_xargs,
        )


class CompletionRequest(_SamplingRequest):
    # a string, several strings, one token-id prompt or several token-id prompts
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False  # the prompt before each completion (and with logprobs, the prompt tokens' logprobs)

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list; choice i * n + j answers prompt i."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        # pydantic matched one of the list types, so the first item tells which
        if isinstance(prompt[0], int):
            return [cast("list[int]", prompt)]
        return list(cast("list[str] | list[list[int]]", prompt))

    def to_sampling_params(self) -> SamplingParams:
        params = self._sampling_params(self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs
        return params


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result: the call it answers
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call (enforced where tool_choice forces calls)

    @property
    def active_tools(self) -> list[Tool] | None:
        """The tools the model is offered (none when there are none or tool_choice is "none")."""
        return self.tools if self.tools and self.tool_choice != "none" else None

    @property
    def forced_function(self) -> str | None:
        """The function tool_choice names, if it names one."""
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    @property
    def forces_call(self) -> bool:
        """`required` or a named function: the output must be calls."""
        return self.active_tools is not None and (self.tool_choice == "required" or self.forced_function is not None)

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        name = self.forced_function
        if name is not None and self.tools and name not in {t.function.name for t in self.tools}:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        params = self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)
        if self.forces_call and params.structured_outputs is not None:  # forced calls bring their own constraint
            raise InvalidRequestError(
                f"tool_choice {self.tool_choice if name is None else name!r} cannot be combined with "
                f"{params.structured_outputs.param}",
                "tool_choice",
            )
        return params


class TokenizeRequest(_Request):
    """vLLM's two tokenize bodies in one: a completion's `prompt` or a chat's `messages`."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("give either prompt or messages", "prompt" if self.prompt is None else "messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(default=None, exclude_if=_is_none)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=_is_none)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    name: str | None = Field(default=None, exclude_if=_is_none)
    arguments: str | None = Field(default=None, exclude_if=_is_none)


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = Field(default=None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_is_none)
    function: DeltaFunctionCall | None = Field(default=None, exclude_if=_is_none)


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    content: str | None = Field(default=None, exclude_if=_is_none)
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = Field(default=None, exclude_if=_is_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "leapserve"
    max_model_len: int


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


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
