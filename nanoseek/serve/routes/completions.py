"""POST /v1/completions, also at /completions and DeepSeek's /beta/completions (`suffix`: fill-in-the-middle
is served on all three): up to MAX_PROMPTS prompts batched as one request, echo with logprobs scoring a
prompt (lm-eval's loglikelihood), a whole Completion or, for one prompt, CompletionChunk events.

Replies are built as dicts (protocol.py says why); Completion and CompletionChunk document them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from nanoseek.serve import errors
from nanoseek.serve.admission import Ticket
from nanoseek.serve.engine import RequestOutput
from nanoseek.serve.errors import ApiError
from nanoseek.serve.generation import EventStream, TextDeltas, sse, stream_events
from nanoseek.serve.protocol import (
    MAX_SCORED_ENTRIES,
    Completion,
    CompletionChunk,
    CompletionRequest,
    completion_logprobs,
    usage,
)
from nanoseek.serve.routes.common import GENERATING, ApiKey, ServiceDep, error_docs, event_stream
from nanoseek.serve.service import Service
from nanoseek.tokenizer import FIM_HOLE

router = APIRouter()
DOCS = {
    "response_model": Completion,
    "responses": event_stream(CompletionChunk, "the Completion") | error_docs(*GENERATING),
}


@router.post("/v1/completions", **DOCS)
@router.post("/completions", **DOCS)
@router.post("/beta/completions", **DOCS)  # DeepSeek's beta route for fill-in-the-middle (suffix)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep, key: ApiKey) -> Response:
    prompts = body.prompt if isinstance(body.prompt, list) and body.prompt else [body.prompt]
    if isinstance(prompts[0], int):
        prompts = [prompts]
    if body.suffix is not None:
        if len(prompts) != 1 or not isinstance(prompts[0], str):
            raise ApiError(400, "suffix (fill-in-the-middle) takes one text prompt", param="suffix")
        if service.tokenizer.tok.token_to_id(FIM_HOLE) is None:
            raise ApiError(400, "this model's tokenizer has no fill-in-the-middle tokens", param="suffix")
    if body.max_tokens == 0 and not body.scoring:
        raise errors.nothing_to_generate()
    if body.scoring and body.stream:
        raise ApiError(
            400, "echo with logprobs (scoring the prompt) is answered whole: send it without stream", param="stream"
        )
    if len(prompts) > 1 and body.stream:
        raise ApiError(400, "stream takes one prompt: send several prompts without stream", param="stream")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(
            400, "best_of must equal n: nanoseek returns every choice it generates, unranked", param="best_of"
        )
    ticket = service.admission.admit(body, body.n * len(prompts), key)
    with ticket.released_on_error():
        return await complete(service, body, request, key, ticket, prompts)


async def complete(
    service: Service, body: CompletionRequest, request: Request, key: str, ticket: Ticket, prompts: list
) -> Response:
    tokenizer, preprocess = service.tokenizer, service.preprocess
    encoded = await preprocess.completion_prompts(prompts, body.suffix)
    scored = body.logprobs if body.scoring else None  # echo with logprobs: the prompt's log-probs too
    if scored is not None:
        entries = sum(len(ids) + body.max_tokens for ids in encoded) * body.n * (scored + 1)
        if entries > MAX_SCORED_ENTRIES:
            raise errors.too_many_scored(entries, MAX_SCORED_ENTRIES)
    sampling = [preprocess.sampling_params(body, p, body.max_tokens, body.logprobs, "prompt", scored) for p in encoded]
    jobs = list(zip(encoded, sampling, strict=True))
    meters = await service.admission.reserve(key, jobs)
    # Every prompt goes to the engine before any is awaited, so they batch.
    generations = [
        service.start(ids, params, key, meter, ticket) for (ids, params), meter in zip(jobs, meters, strict=True)
    ]
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": service.fingerprint,
    }

    def echoed(p: int) -> str:
        return "" if not body.echo else prompts[p] if isinstance(prompts[p], str) else tokenizer.decode(encoded[p])

    def logprobs_of(out: RequestOutput, new: slice = slice(None), offset: int = 0) -> dict | None:
        """offset: where the first of these tokens lies in the whole text (the echoed prompt included)."""
        if body.logprobs is None:
            return None
        if body.scoring:  # the prompt's tokens first (the first scored by nothing), then the reply's
            ids, logprobs = out.prompt_token_ids + out.token_ids, out.prompt_logprobs + out.logprobs
            return completion_logprobs(tokenizer, ids, logprobs)
        return completion_logprobs(tokenizer, out.token_ids[new], out.logprobs[new], offset)

    def usage_now() -> dict:
        return usage(
            sum(len(ids) for ids, _ in jobs),
            sum(g.cached for g in generations),
            sum(g.completion for g in generations),
        )

    if not body.stream:
        try:
            results = await asyncio.gather(*(service.collect(request, g) for g in generations))
        finally:
            for g in generations:
                g.close()

        def answer() -> dict:
            choices = [
                {
                    "index": p * body.n + j,
                    "text": echoed(p) + out.text,
                    "logprobs": logprobs_of(out, offset=len(echoed(p))),
                    "finish_reason": out.finish_reason,
                }
                for p, outs in enumerate(results)
                for j, out in enumerate(outs)
            ]
            return head | {"choices": choices, "usage": usage_now()}

        if body.logprobs is None:
            return JSONResponse(answer())
        # log-probabilities can run to megabytes of JSON: built and encoded off the event loop
        content = await asyncio.to_thread(lambda: json.dumps(answer()).encode())
        return Response(content, media_type="application/json")

    base = head | ({"usage": None} if body.include_usage else {})
    deltas, sent_logprobs = [TextDeltas(body.stop_list) for _ in range(body.n)], [0] * body.n
    offsets = [len(echoed(0))] * body.n  # text_offset runs on across chunks, as in the whole text

    def chunk(j: int, text: str, logprobs: dict | None = None, finish: str | None = None) -> str:
        return sse(base | {"choices": [{"index": j, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    def chunks(j: int, out: RequestOutput, finished: bool) -> Iterator[str]:
        piece = deltas[j].advance({"reasoning_content": "", "content": out.text}, finished).get("content")
        if piece or finished:  # log-probs of held-back tokens go with the next chunk
            new = slice(sent_logprobs[j], len(out.logprobs))
            yield chunk(j, piece or "", logprobs_of(out, new, offsets[j]), out.finish_reason)
            offsets[j] += sum(len(tokenizer.decode([t])) for t in out.token_ids[new])
            sent_logprobs[j] = len(out.logprobs)

    opening = [chunk(j, echoed(0)) for j in range(body.n if body.echo else 0)]
    closing = lambda: [sse(base | {"choices": [], "usage": usage_now()})] if body.include_usage else []  # noqa: E731
    return EventStream(generations[0], stream_events(generations[0], opening, chunks, closing))
