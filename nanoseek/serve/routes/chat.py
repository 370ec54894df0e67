"""POST /v1/chat/completions, also at /chat/completions and DeepSeek's /beta/chat/completions (chat prefix
completion is served on all three): a whole ChatCompletion, or ChatCompletionChunk events with `stream`.

Replies are built as dicts (protocol.py says why); ChatCompletion and ChatCompletionChunk document them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from nanoseek.serve import errors
from nanoseek.serve.admission import Ticket
from nanoseek.serve.engine import RequestOutput
from nanoseek.serve.generation import EventStream, TextDeltas, sse, stream_events
from nanoseek.serve.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, chat_logprobs, usage
from nanoseek.serve.routes.common import GENERATING, ApiKey, ServiceDep, error_docs, event_stream
from nanoseek.serve.service import Service
from nanoseek.serve.tools import ToolCall, parse_tool_calls

router = APIRouter()
DOCS = {
    "response_model": ChatCompletion,
    "responses": event_stream(ChatCompletionChunk, "the ChatCompletion") | error_docs(*GENERATING),
}


@router.post("/v1/chat/completions", **DOCS)
@router.post("/chat/completions", **DOCS)
@router.post("/beta/chat/completions", **DOCS)  # DeepSeek's beta route (prefix completion is served on all three)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep, key: ApiKey) -> Response:
    ticket = service.admission.admit(body, body.n, key)
    with ticket.released_on_error():
        return await chat(service, body, request, key, ticket)


async def chat(service: Service, body: ChatCompletionRequest, request: Request, key: str, ticket: Ticket) -> Response:
    tokenizer = service.tokenizer
    prefix = body.messages[-1].prefix
    if any(m.prefix for m in body.messages[:-1]) or (prefix and body.messages[-1].role != "assistant"):
        raise errors.misplaced_prefix()
    preprocess = service.preprocess
    tools = preprocess.check_tools(body)
    thinking = service.cfg.thinks(body.model, body.thinking and body.thinking.type)
    prompt = await preprocess.chat_prompt(
        [m.template_dict() for m in body.messages], None if prefix else thinking, prefix, tools
    )
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = preprocess.sampling_params(body, prompt, body.max_completion_tokens or body.max_tokens, top, "messages")
    await preprocess.steer(body, prompt, params)
    [meter] = await service.admission.reserve(key, [(prompt, params)])
    generation = service.start(prompt, params, key, meter, ticket)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    head = {
        "id": request_id,
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": service.fingerprint,
    }

    def logprobs_of(out: RequestOutput, new: slice = slice(None)) -> dict | None:
        return None if top is None else chat_logprobs(tokenizer, out.token_ids[new], out.logprobs[new], top)

    def usage_now() -> dict:
        reasoning = sum(out.reasoning_tokens for out in generation.latest)
        return usage(len(prompt), generation.cached, generation.completion, reasoning)

    def reply(out: RequestOutput) -> tuple[str, list[ToolCall], str | None]:
        """The content, the complete tool calls so far, and the finish reason ("tool_calls" if any)."""
        if not tools or out.tool_calls_at is None:
            return out.content, [], out.finish_reason
        chars, token = out.tool_calls_at
        calls = parse_tool_calls(tokenizer, out.token_ids[token + 1 :])[: None if body.parallel_tool_calls else 1]
        finish = "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason
        return out.content[:chars], calls, finish

    if not body.stream:
        choices = []
        for i, out in enumerate(await service.collect(request, generation)):
            content, calls, finish = reply(out)
            message = {"role": "assistant", "content": content}
            if out.reasoning_tokens:
                message["reasoning_content"] = out.reasoning_content
            if calls:
                message["tool_calls"] = [call.to_openai(j, f"{request_id}/{i}") for j, call in enumerate(calls)]
            choices.append({"index": i, "message": message, "logprobs": logprobs_of(out), "finish_reason": finish})
        return JSONResponse(head | {"object": "chat.completion", "choices": choices, "usage": usage_now()})

    base = head | {"object": "chat.completion.chunk"} | ({"usage": None} if body.include_usage else {})
    deltas, sent_logprobs = [TextDeltas(body.stop_list) for _ in range(body.n)], [0] * body.n
    sent_calls = [0] * body.n

    def chunk(i: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> str:
        return sse(base | {"choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    def chunks(i: int, out: RequestOutput, finished: bool) -> Iterator[str]:
        # Log-probs ride on the next chunk that goes out; held-back text keeps them waiting.
        logprobs = logprobs_of(out, slice(sent_logprobs[i], None))
        content, calls, finish = reply(out)
        parts = {"reasoning_content": out.reasoning_content, "content": content}
        for name, piece in deltas[i].advance(parts, finished or bool(calls)).items():
            yield chunk(i, {name: piece}, logprobs)
            logprobs, sent_logprobs[i] = None, len(out.logprobs)
        if len(calls) > sent_calls[i]:  # each call goes out whole, once its <｜tool▁call▁end｜> came
            new = [
                call.to_openai(j, f"{request_id}/{i}", with_index=True)
                for j, call in enumerate(calls)
                if j >= sent_calls[i]
            ]
            yield chunk(i, {"tool_calls": new}, logprobs)
            logprobs, sent_logprobs[i], sent_calls[i] = None, len(out.logprobs), len(calls)
        if finished:
            yield chunk(i, {}, logprobs, finish)

    opening = [chunk(i, {"role": "assistant", "content": ""}) for i in range(body.n)]
    closing = lambda: [sse(base | {"choices": [], "usage": usage_now()})] if body.include_usage else []  # noqa: E731
    return EventStream(generation, stream_events(generation, opening, chunks, closing))
