"""The OpenAI / DeepSeek API's shapes: request models (validated, bounded, so that no field value can
reach the engine unchecked), response models (what /openapi.json documents), and the builders of the
pieces the generation routes send as dicts (usage, logprobs).

Usage follows DeepSeek's: prompt_cache_hit_tokens + prompt_cache_miss_tokens = prompt_tokens, with
OpenAI's prompt_tokens_details.cached_tokens and completion_tokens_details.reasoning_tokens beside.

The small routes (models, billing, tokenizer, health) are serialised through their response models. The
generation routes build dicts, streamed chunks above all (a model per chunk costs time per token), and
whole replies too: logprobs can run to megabytes, and json.dumps keeps their bytes as they always were.
Their models document those dicts; tests check that every reply and chunk matches them exactly.
"""

from __future__ import annotations

import itertools
import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from nanoseek.serve.sampling import SamplingParams
from nanoseek.tokenizer import Tokenizer

DEFAULTS = SamplingParams()

MAX_SEED = 2**63 - 1
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_SCORED_ENTRIES = 262_144  # log-probabilities (scored tokens x (1 + top)) one echoed request may ask for


def _utf8(text: str) -> str:
    """JSON can carry a lone surrogate (\ud800) that no UTF-8 text holds: refuse it here, not in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone UTF-16 surrogate, which is not a character") from None
    return text


def _utf8_json(value: dict) -> dict:
    """A JSON object (a tool's parameters, a response schema) is text too: no lone surrogate anywhere in it."""
    _utf8(json.dumps(value, ensure_ascii=False))
    return value


# Strict types, as OpenAI's API: "5", true and "yes" are not numbers or booleans.
Text = Annotated[str, AfterValidator(_utf8)]
JsonObject = Annotated[dict, AfterValidator(_utf8_json)]
Stop = Annotated[Text, Field(min_length=1, max_length=256)]
Number = Annotated[float, Field(strict=True)]  # an int is a number too; a string or a bool is not
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]
TokenKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]  # a token id as a JSON key: ASCII digits, nothing else


def refused(why: str, allowed: tuple = (None,)):
    """A field of OpenAI's or DeepSeek's API that nanoseek does not serve: a 400 naming it, unless it is
    absent or holds a value that asks for nothing (clients send their defaults)."""

    def check(value: object) -> object:
        if not any(value is a for a in allowed):
            raise PydanticCustomError("unsupported_parameter", why)
        return value

    return Annotated[object, AfterValidator(check)]


class Strict(BaseModel):
    """Every field is declared: one that neither API defines is a 400 naming it, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"] = "text"
    text: Text


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's rule for function names


class FunctionDefinition(Strict):
    name: FunctionName
    description: Text | None = None
    parameters: JsonObject | None = None  # a JSON Schema of the arguments
    strict: StrictBool | None = None  # the arguments must validate against it (decoding is constrained)


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: FunctionName


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(Strict):
    name: FunctionName
    arguments: Text


class ToolCallMessage(Strict):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    tool_calls: list[ToolCallMessage] | None = Field(None, max_length=128)  # an assistant's earlier calls
    tool_call_id: StrictStr | None = None  # which call a tool message answers
    name: StrictStr | None = None  # a participant's name: accepted, not rendered (as DeepSeek's template)
    reasoning_content: Text | None = None  # an earlier reply's reasoning: never fed back (DeepSeek's rule)
    prefix: StrictBool = False  # DeepSeek's chat prefix completion: the reply continues this last message

    def template_dict(self) -> dict:
        """The message as the chat template reads it."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return message

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(Strict):
    include_usage: StrictBool = False


class JsonSchemaFormat(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Text | None = None
    schema_: JsonObject | None = Field(None, alias="schema")  # None: any JSON object
    strict: StrictBool | None = None  # honoured either way: decoding is always constrained to the schema


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class Thinking(Strict):
    """DeepSeek's switch between a reasoning reply (<think> opened by the template) and a direct one."""

    type: Literal["enabled", "disabled"]


class SamplingRequest(Strict):
    """The fields chat and completions share."""

    model: Text = Field(min_length=1, max_length=256)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(DEFAULTS.temperature, ge=0, le=2)  # the engine's defaults, which are OpenAI's
    top_p: Number = Field(DEFAULTS.top_p, ge=0, le=1)
    stop: Stop | list[Stop] | None = Field(None, max_length=16)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    n: StrictInt = Field(1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(None, max_length=256)  # an end-user id for abuse tracking: accepted
    logit_bias: dict[TokenKey, Annotated[float, Field(strict=True, ge=-100, le=100)]] | None = Field(
        None, max_length=300
    )
    service_tier: Literal["auto", "default"] | None = None  # there is one tier
    store: refused("store: nanoseek keeps no completions for later retrieval", allowed=(None, False)) = None
    metadata: refused("metadata: it tags stored completions, and nanoseek stores none") = None
    prompt_cache_key: StrictStr | None = None  # caching is automatic, by prefix (and per API key)
    safety_identifier: StrictStr | None = None

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    thinking: Thinking | None = None
    modalities: list[Literal["text"]] | None = None
    audio: refused("audio: nanoseek generates text only") = None
    prediction: refused("prediction (predicted outputs) is not served: send the text as a prefix instead") = None
    web_search_options: refused("web_search_options: nanoseek has no web search") = None
    reasoning_effort: refused(
        "reasoning_effort: reasoning is on or off here, with thinking or a reasoning model name"
    ) = None
    verbosity: refused("verbosity is not served: ask for the length you want in the prompt") = None
    functions: refused("functions (deprecated by OpenAI) is not served: send tools") = None
    function_call: refused("function_call (deprecated by OpenAI) is not served: send tool_choice") = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True  # False: at most one call per reply

    @field_validator("messages")
    @classmethod
    def _tool_turns(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        """OpenAI's rules for tool turns: a tool message answers (by tool_call_id) a call of the assistant
        message before it; an assistant's call arguments are JSON."""
        calls: list[str | None] | None = None  # the ids of the calls the last assistant turn made
        for i, m in enumerate(messages):
            if m.role == "tool":
                if m.tool_call_id is None:
                    raise ValueError(f"messages[{i}]: a tool message needs the tool_call_id of the call it answers")
                if calls is None:
                    raise ValueError(f"messages[{i}]: a tool message must follow an assistant message with tool_calls")
                if any(calls) and m.tool_call_id not in calls:
                    raise ValueError(f"messages[{i}]: tool_call_id {m.tool_call_id!r} answers no call before it")
                continue
            calls = [c.id for c in m.tool_calls] if m.role == "assistant" and m.tool_calls else None
            for call in m.tool_calls or []:
                try:
                    json.loads(call.function.arguments)
                except ValueError:
                    raise ValueError(f"messages[{i}]: the arguments of {call.function.name} are not JSON") from None
        return messages

    @property
    def tool_mode(self) -> str | None:
        """none / auto / required / a function's name; None without tools."""
        if not self.tools:
            return None
        choice = self.tool_choice or "auto"
        return choice if isinstance(choice, str) else choice.function.name


class CompletionRequest(SamplingRequest):
    # One text, up to MAX_PROMPTS texts, one list of token ids, or up to MAX_PROMPTS such lists (the bound
    # is on the number of prompts; a prompt's length is bounded by the model's context).
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    suffix: Text | None = None
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    max_tokens: StrictInt | None = Field(16, ge=0)  # 0: score the prompt only (echo with logprobs)
    best_of: StrictInt | None = Field(None, ge=1, le=16)  # honoured when it equals n: nothing is ranked

    @property
    def scoring(self) -> bool:
        """echo with logprobs: the prompt's own log-probabilities too (lm-eval's loglikelihood requests)."""
        return self.echo and self.logprobs is not None


class TokenizeRequest(Strict):
    """vLLM's POST /tokenize (lm-eval's remote tokenizer uses it): a text, or chat messages through the
    template. A text's special-token strings are the special tokens, as in vLLM and transformers."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=1024)
    add_special_tokens: StrictBool = True  # a text: the begin-of-sentence token first
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool = False


class DetokenizeRequest(Strict):
    model: Text | None = None
    tokens: list[StrictInt] = Field(max_length=1 << 20)


# --- responses ------------------------------------------------------------------------------------------
# Every field is sent, null where typed `| None`, except those with a default: left out of a reply that has
# none (`| Absent`: never null). Required fields in the schema are the ones always sent.
Absent = SkipJsonSchema[None]
FinishReason = Literal["stop", "length"]


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, not_found_error, rate_limit_error, ...
    param: str | None  # the request field at fault
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: every error status, and the error event that ends a failed stream."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    """DeepSeek's usage (prompt_cache_hit_tokens + prompt_cache_miss_tokens = prompt_tokens) with OpenAI's details."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes (a token can hold part of a character)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCallReply(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallReply(BaseModel):
    id: str  # the same in every chunk and reply of one request
    type: Literal["function"]
    function: FunctionCallReply


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    reasoning_content: str | Absent = None  # a reply that reasoned: the text before its </think>
    tool_calls: list[ToolCallReply] | Absent = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | Literal["tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str  # the served weights' fingerprint
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(ToolCallReply):
    index: int  # each call is streamed whole, in one chunk


class ChatDelta(BaseModel):
    """One piece of a choice: its role and an empty content first, then reasoning, content or tool calls."""

    role: Literal["assistant"] | Absent = None
    content: str | Absent = None
    reasoning_content: str | Absent = None
    tool_calls: list[ToolCallDelta] | Absent = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | Literal["tool_calls"] | None  # set on a choice's last chunk


class ChatCompletionChunk(BaseModel):
    """An event of a streamed chat completion."""

    id: str
    created: int
    model: str
    system_fingerprint: str
    object: Literal["chat.completion.chunk"]
    # Only with stream_options.include_usage: null on every chunk, and a last chunk with no choices holds it.
    usage: Usage | None = None
    choices: list[ChatChunkChoice]


class CompletionLogprobs(BaseModel):
    """The legacy shape; an echoed prompt's first token, which nothing predicts, has null log-probabilities."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int  # prompt index x n + choice
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(CompletionChoice):
    finish_reason: FinishReason | None  # set on a choice's last chunk


class CompletionChunk(BaseModel):
    """An event of a streamed completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    usage: Usage | None = None  # as in ChatCompletionChunk
    choices: list[CompletionChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenPrices(BaseModel):
    cache_hit_input: float
    cache_miss_input: float
    output: float


class BillingUsage(BaseModel):
    requests: int
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int
    completion_tokens: int


class BillingSummary(BaseModel):
    """GET /v1/billing: the key's totals, their cost, its balance (null: unlimited) and the price table."""

    object: Literal["billing.summary"]
    currency: str
    per_million_tokens: TokenPrices
    usage: BillingUsage
    cost: float
    balance: float | None
    reserved: float  # what open requests may still spend


class BalanceInfo(BaseModel):
    currency: str
    total_balance: str  # two decimals, or "inf" for a key without a balance
    granted_balance: str
    topped_up_balance: str


class UserBalance(BaseModel):
    """DeepSeek's GET /user/balance."""

    is_available: bool
    balance_infos: list[BalanceInfo]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None  # with return_token_strs


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    bos_token: str
    eos_token: str
    pad_token: str | None
    chat_template: str
    model_max_length: int
    vocab_size: int


class Health(BaseModel):
    status: Literal["ok"]
    running: int
    waiting: int
    pending: int  # requests in flight, counted against --max-pending


class HealthUnavailable(BaseModel):
    """/health's 503: a failed engine, or a ledger that takes no writes."""

    status: Literal["unavailable"]
    reason: str


def usage(prompt: int, cached: int, completion: int, reasoning: int = 0) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_cache_hit_tokens": cached,
        "prompt_cache_miss_tokens": prompt - cached,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list, top: int) -> dict:
    """OpenAI's chat logprobs: per token its text, bytes, log-probability and the top alternatives."""

    def entry(token: int, logprob: float) -> dict:
        return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}

    content = []
    for token, (logprob, alternatives) in zip(token_ids, logprobs, strict=False):
        item = entry(token, logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in list((alternatives or {}).items())[:top]]
        content.append(item)
    return {"content": content}


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list, offset: int = 0) -> dict:
    """The legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset. An entry of
    None (an echoed prompt's first token, which nothing predicts) gives null log-probabilities."""
    tokens = [tokenizer.decode([t]) for t in token_ids[: len(logprobs)]]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset)) if tokens else []
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e[0] for e in logprobs],
        "top_logprobs": [
            None if e is None else {tokenizer.decode([t]): v for t, v in (e[1] or {}).items()} for e in logprobs
        ],
        "text_offset": offsets,
    }
