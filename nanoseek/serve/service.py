"""What the API's routes stand on: a small service that composes admission (admission.py: keys, limits,
tickets, the ledger's reservations) with request building (preprocess.py: prompts, tools, grammars,
sampling parameters), and starts and collects generations on the engine thread. The routes
(serve/routes/) only shape requests and responses."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request

from nanoseek.serve import errors
from nanoseek.serve.admission import ANONYMOUS, Admission, Ticket
from nanoseek.serve.async_engine import AsyncEngine
from nanoseek.serve.config import CACHE_UNIT, ServeConfig
from nanoseek.serve.engine import Engine, RequestOutput
from nanoseek.serve.errors import ApiError
from nanoseek.serve.generation import Generation
from nanoseek.serve.ledger import Meter
from nanoseek.serve.metrics import ServerMetrics
from nanoseek.serve.parallel import DataParallelFront, engine_for
from nanoseek.serve.preprocess import Preprocessor
from nanoseek.serve.sampling import SamplingParams

__all__ = ["ServeConfig", "Service"]


class Service:
    def __init__(self, cfg: ServeConfig, engine: Engine | DataParallelFront | None = None):
        self.cfg = cfg
        # under torchrun, the front over every rank's engine (serve/parallel.py)
        self.engine = engine or engine_for(cfg.model, cfg.engine, CACHE_UNIT)
        try:
            self.engine.capture()
            if self.engine.tokenizer is None:
                raise ValueError(f"{cfg.model} has no tokenizer.json: the server needs the model's tokenizer")
            self.engine.grammars.ll_tokenizer  # noqa: B018 - built now (a second for a 129k vocabulary)
            self.preprocess = Preprocessor(self.engine)
            self.admission = Admission(cfg, pending=lambda: self.runner.pending)
        except BaseException:
            self.engine.close()  # the disk cache's writes, and a torchrun launch's other ranks
            raise
        self.tokenizer, self.context = self.preprocess.tokenizer, self.preprocess.context
        self.runner = AsyncEngine(self.engine)
        self.metrics = ServerMetrics(self.engine)
        self.created = int(time.time())
        self.fingerprint = self.engine.fingerprint.hex()[:16]

    def close(self) -> None:
        self.runner.shutdown()  # finishes the disk cache's writes
        self.admission.close()  # and the ledger's

    # --- generations ---------------------------------------------------------------------------------
    def start(
        self, prompt: list[int], params: list[SamplingParams], key: str, meter: Meter, ticket: Ticket
    ) -> Generation:
        if self.runner.failed is not None:
            raise errors.engine_unavailable(self.runner.failed)
        salt = None if key == ANONYMOUS else key
        return Generation(self.runner, self.metrics, prompt, params, salt, meter, ticket.hold().release)

    async def collect(self, request: Request, generation: Generation) -> list[RequestOutput]:
        """The final output of every choice, billed; a client that leaves cancels the generation."""

        async def drain():
            async for _ in generation:
                pass

        async def until_disconnected() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.2)

        work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(until_disconnected())
        try:
            await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            generation.close()
        if not work.done() or work.cancelled():
            raise ApiError(499, "the client closed the request", code="client_closed_request")
        work.result()
        return generation.latest
