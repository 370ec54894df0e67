"""One prompt's generation as the API sees it: its n choices in the engine, read as they grow, billed as
they reach the client, cancelled when the client leaves; and the one helper that streams any of them as
server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable

from fastapi.responses import StreamingResponse

from nanoseek.serve.async_engine import AsyncEngine, EngineError
from nanoseek.serve.engine import RequestOutput
from nanoseek.serve.errors import ApiError, engine_unavailable
from nanoseek.serve.ledger import Meter
from nanoseek.serve.metrics import ServerMetrics
from nanoseek.serve.output import releasable
from nanoseek.serve.sampling import SamplingParams

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class TextDeltas:
    """What of a choice's reasoning and content may be sent now: text that a stop string may still cut,
    or a half-decoded character, waits."""

    def __init__(self, stop: list[str]):
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = {"reasoning_content": 0, "content": 0}

    def advance(self, parts: dict[str, str], finished: bool) -> dict[str, str]:
        out = {}
        for name, text in parts.items():
            ready = len(text) if finished or (name == "reasoning_content" and parts["content"]) else None
            end = releasable(text, self.hold) if ready is None else ready
            if end > self.sent[name]:
                out[name] = text[self.sent[name] : end]
                self.sent[name] = end
        return out


class Generation:
    """The n choices of one prompt in the engine: submitted at once (so admission counts them), read as
    (choice, output so far) pairs, cancelled if the reader goes away before they finish."""

    def __init__(
        self,
        runner: AsyncEngine,
        metrics: ServerMetrics,
        prompt: list[int],
        params: list[SamplingParams],
        salt: str | None,
        meter: Meter,
        on_close: Callable[[], None] = lambda: None,
    ):
        self.runner, self.metrics, self.prompt, self.meter, self.on_close = runner, metrics, prompt, meter, on_close
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids = [runner.submit(prompt, p, salt, self.queue) for p in params]
        self.live = set(self.ids)
        self.latest: list[RequestOutput] = [RequestOutput(i, prompt, [], "", None) for i in self.ids]
        self.start, self.failed = time.perf_counter(), False
        self._last = [self.start] * len(self.ids)

    @property
    def cached(self) -> int:  # the prompt is billed once: by its first choice's cache hits
        return self.latest[0].cached_tokens

    @property
    def completion(self) -> int:
        return sum(out.completion_tokens for out in self.latest)

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        index = {r: i for i, r in enumerate(self.ids)}
        while self.live:
            item = await self.queue.get()
            if isinstance(item, EngineError):
                self.live.discard(item.request_id)
                self.failed = True
                if item.status == 503:  # the engine can no longer generate: the words a new request gets
                    raise engine_unavailable(item.message)
                raise ApiError(item.status, item.message, type="server_error")
            i, now = index[item.request_id], time.perf_counter()
            previous = self.latest[i]
            if previous.token_ids:
                new = max(1, len(item.token_ids) - len(previous.token_ids))
                for _ in range(new):
                    self.metrics.itl.observe((now - self._last[i]) / new)
            else:
                self.metrics.ttft.observe(now - self.start)
            self._last[i] = now
            self.latest[i] = item
            if item.finish_reason is not None:
                self.live.discard(item.request_id)
                self.metrics.e2e.observe(now - self.start)
            yield i, item

    def cancel(self) -> None:
        for request_id in self.live:
            self.runner.cancel(request_id)
        self.live.clear()

    def deliver(self) -> None:
        """Bill what the client has now: the prompt once, every choice's tokens so far."""
        self.meter.deliver(self.cached, len(self.prompt) - self.cached, self.completion)

    def close(self, streamed: bool = False) -> None:
        """Stop generating and settle the bill. A stream pays for what it was sent; a plain request for what
        was made, also when its client left early (the tokens were computed for it); a request the server
        failed, only for what it had streamed."""
        self.cancel()
        if not (self.failed or streamed):
            self.deliver()
        if not self.meter.closed:
            self.on_close()
        self.meter.close()


async def stream_events(
    generation: Generation,
    opening: Iterable[str],
    chunks: Callable[[int, RequestOutput, bool], Iterable[str]],
    closing: Callable[[], Iterable[str]],
) -> AsyncIterator[str]:
    """Server-sent events for a generation: the opening chunks, then each choice's chunks as its output
    grows (billed once they are out), the closing chunks and [DONE]; an engine error as an error event.
    However it ends (also when the client disconnects), the generation stops and its bill is settled."""
    try:
        for event in opening:
            yield event
        async for i, out in generation:
            for event in chunks(i, out, out.finish_reason is not None):
                yield event
            generation.deliver()
        for event in closing():
            yield event
        yield DONE
    except ApiError as e:
        yield sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
    finally:
        generation.close(streamed=True)


class EventStream(StreamingResponse):
    """The SSE response of a generation: however the response ends, even before its first event (a client
    gone before the stream started), the generation stops and its bill is settled."""

    def __init__(self, generation: Generation, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close(streamed=True)
