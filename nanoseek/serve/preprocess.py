"""Request building: from an API request to what the engine runs. The chat template's prompt (the length
checked before tokenising, an earlier reply's reasoning dropped), the tools, the grammar that constrains
JSON output and tool calls (compiled off the event loop), text or token-id completion prompts, and each
choice's sampling parameters (logit_bias included). Who may ask and whether the server takes the request
is admission.py's.

    nanoseek serve --model DIR
"""

from __future__ import annotations

import asyncio
import json
import re

from nanoseek.serve import errors
from nanoseek.serve.engine import Engine
from nanoseek.serve.errors import ApiError
from nanoseek.serve.grammar import json_grammar, tool_grammar
from nanoseek.serve.parallel import DataParallelFront
from nanoseek.serve.protocol import MAX_SEED, ChatCompletionRequest, SamplingRequest
from nanoseek.serve.sampling import SamplingParams
from nanoseek.tokenizer import END_THINK, THINK, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_TOKENS

DEFAULT_MAX_TOKENS = 4096


def grammar_error(message: str) -> str:
    """llguidance's reason on one line, without its position and its listing of our grammar."""
    lines = []
    for line in message.splitlines():
        if re.match(r"\s*\d+ \|", line):  # the grammar listing starts
            break
        lines.append(line.strip())
    return re.sub(r"^at \d+\(\d+\): ", "", " ".join(line for line in lines if line))


class Preprocessor:
    """The engine's tokenizer, context and grammar compiler, applied to requests."""

    def __init__(self, engine: Engine | DataParallelFront):
        self.engine = engine
        self.tokenizer, self.context = engine.tokenizer, engine.model.cfg.max_position_embeddings

    def check_text_length(self, texts: list[str], param: str) -> None:
        """Refuse, before tokenising, text that holds more tokens than the context for certain."""
        longest = self.tokenizer.longest_token_bytes
        size = sum(len(t.encode()) for t in texts)
        if size > self.context * longest:
            raise errors.text_exceeds_context(size, self.context, longest, param)

    async def chat_prompt(
        self,
        messages: list[dict],
        thinking: bool | None,
        prefix: bool,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """The chat template's ids. An earlier reply's reasoning (before its </think>) is not fed back, as
        DeepSeek's multi-turn rule; a prefix message (the last, an assistant's) is continued."""
        calls = [c["function"] for m in messages for c in m.get("tool_calls") or []]
        texts = [m["content"] for m in messages] + [f["name"] + f["arguments"] for f in calls]
        self.check_text_length(texts, "messages")  # every text the template renders, before tokenising
        if tools:
            self.check_text_length([*texts, json.dumps(tools, ensure_ascii=False)], "tools")
        if thinking is not None and self.tokenizer.tok.token_to_id(END_THINK) is None:
            raise ApiError(
                400, "this model's tokenizer has no <think> tokens: it cannot switch thinking", param="thinking"
            )
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and not (prefix and i == len(messages) - 1):
                m["content"] = m["content"].rpartition(END_THINK)[2]
        try:
            return await asyncio.to_thread(
                self.tokenizer.apply_chat_template,
                messages,
                tokenize=True,
                thinking=thinking,
                continue_final_message=prefix,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
            )
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None

    def check_tools(self, body: ChatCompletionRequest) -> list[dict] | None:
        """The request's tools for the template (None without); a 400 for a tool_choice that cannot hold."""
        choice = body.tool_choice
        if not body.tools:
            if choice not in (None, "none"):
                raise ApiError(400, "tool_choice needs tools to choose from", param="tool_choice")
            return None
        if any(self.tokenizer.tok.token_to_id(t) is None for t in TOOL_TOKENS):
            raise errors.no_tool_tokens()
        names = [t.function.name for t in body.tools]
        if len(set(names)) < len(names):
            raise ApiError(400, "two tools have the same name", param="tools")
        if body.tool_mode not in (*names, "none", "auto", "required"):
            raise ApiError(
                400, f"tool_choice names {body.tool_mode!r}, which is not among the tools {names}", param="tool_choice"
            )
        return [t.model_dump(exclude_none=True) for t in body.tools]

    async def steer(self, body: ChatCompletionRequest, prompt: list[int], params: list[SamplingParams]) -> None:
        """response_format and tool_choice in the sampler: a grammar for JSON output, for required, named or
        strict tool calls (compiled off the event loop); the calls end the reply; tool_choice "none" bans
        them."""
        reasoning = prompt[-1] == self.tokenizer.tok.token_to_id(THINK)
        grammar = await asyncio.to_thread(self.grammar, body, reasoning)
        tok = self.tokenizer.tok
        for p in params:
            p.grammar = grammar
            if body.tool_mode == "none":  # no call can begin, so none ends the reply
                p.logit_bias = {**p.logit_bias, tok.token_to_id(TOOL_CALLS_BEGIN): float("-inf")}
            elif body.tools:
                p.stop_token_ids = [*p.stop_token_ids, tok.token_to_id(TOOL_CALLS_END)]

    def grammar(self, body: ChatCompletionRequest, reasoning: bool) -> str | None:
        """The llguidance grammar the reply must match (None: free text); a 400 that names what a schema
        asks for and cannot be constrained. A reasoning reply is free until its </think>."""
        fmt, mode = body.response_format, body.tool_mode
        json_out = fmt is not None and fmt.type != "text"
        # Constrained calls: required, a named function, or auto when some function is strict.
        calls = mode not in (None, "none", "auto") or (mode == "auto" and any(t.function.strict for t in body.tools))
        if json_out and calls:
            raise errors.constrained_twice()
        if (json_out or calls) and body.messages[-1].prefix:
            raise errors.prefix_with_grammar()
        if json_out:
            schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema else None
            if fmt.type == "json_schema" and fmt.json_schema is None:
                raise ApiError(
                    400, "response_format json_schema needs its json_schema: {name, schema}", param="response_format"
                )
            grammar, param = json_grammar(self.tokenizer, schema, reasoning), "response_format"
        elif calls:
            tools = [t.model_dump(exclude_none=True) for t in body.tools]
            grammar, param = tool_grammar(self.tokenizer, tools, mode, body.parallel_tool_calls, reasoning), "tools"
        else:
            return None
        try:
            self.engine.grammars.matcher(grammar)
        except ValueError as e:
            reason = grammar_error(str(e))
            raise ApiError(
                400, f"{param}: the JSON Schema cannot be enforced: {reason}", param=param, code="unsupported_schema"
            ) from None
        return grammar

    async def completion_prompts(self, prompts: list, suffix: str | None) -> list[list[int]]:
        """Text prompts as plain text (typed special-token strings stay text); token ids as given."""
        for p in prompts:
            if isinstance(p, str):
                self.check_text_length([p, suffix or ""], "prompt")
        return await asyncio.to_thread(self._encode_prompts, prompts, suffix)

    def _encode_prompts(self, prompts: list, suffix: str | None) -> list[list[int]]:
        tok = self.tokenizer
        if suffix is not None:  # fill-in-the-middle, exactly as the models nanoseek trains saw it
            return [tok.fim_ids(prompts[0], suffix)]
        return [tok.encode_text(p) if isinstance(p, str) else list(p) for p in prompts]

    def sampling_params(
        self,
        body: SamplingRequest,
        prompt: list[int],
        max_tokens: int | None,
        logprobs: int | None,
        param: str,
        prompt_logprobs: int | None = None,
    ) -> list[SamplingParams]:
        context = self.context
        wanted = max_tokens if max_tokens is not None else max(1, min(DEFAULT_MAX_TOKENS, context - len(prompt)))
        if len(prompt) + wanted > context:
            raise errors.context_exceeded(len(prompt), wanted, context, param)
        greedy = body.temperature == 0 or body.top_p == 0
        try:
            params = [
                SamplingParams(
                    max_tokens=wanted,
                    temperature=0.0 if greedy else body.temperature,
                    top_p=1.0 if greedy else body.top_p,
                    stop=body.stop_list,
                    seed=None if body.seed is None else (body.seed + i) % MAX_SEED,
                    presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty,
                    logprobs=logprobs,
                    logit_bias=self.logit_bias(body),
                    prompt_logprobs=prompt_logprobs,
                )
                for i in range(body.n)
            ]
            self.engine.check_request(prompt, params[0])
        except ValueError as e:
            raise ApiError(400, str(e), param=param) from None
        return params

    def logit_bias(self, body: SamplingRequest) -> dict[int, float]:
        """Token ids (ASCII digits, checked by the request model) in this model's vocabulary, and their biases."""
        bias = {int(token): value for token, value in (body.logit_bias or {}).items()}
        vocab = self.engine.model.cfg.vocab_size
        if any(token >= vocab for token in bias):
            raise ApiError(400, f"logit_bias token ids must lie in [0, {vocab})", param="logit_bias")
        return bias
