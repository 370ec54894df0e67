"""The engine thread behind the server (nanoseek.serve.async_engine): what a failure tells the client."""

import asyncio
import logging

import torch

from nanoseek import Engine, SamplingParams, Transformer, get_preset
from nanoseek.serve.async_engine import AsyncEngine, EngineError


def test_an_engine_failure_tells_the_client_an_error_id_never_internal_paths(caplog):
    """A gloo error text, with its source path and ports, once reached a 500 body: the client gets a generic
    message with an id; the server's log has the details under that id."""
    torch.manual_seed(0)
    engine = Engine(Transformer(get_preset("tiny")), device="cpu", dtype=torch.float32, enforce_eager=True)

    def fail(plan):  # a fault inside the step, worded as torch.distributed words its errors
        raise RuntimeError("[/__w/pytorch/third_party/gloo/transport/tcp/pair.cc:553] peer 127.0.0.1:29511 gone")

    engine.runner.execute = fail
    runner = AsyncEngine(engine)

    async def ask() -> EngineError:
        out: asyncio.Queue = asyncio.Queue()
        runner.submit([1, 2, 3], SamplingParams(max_tokens=2), None, out)
        return await asyncio.wait_for(out.get(), 30)

    try:
        with caplog.at_level(logging.ERROR, logger="nanoseek.serve"):
            error = asyncio.run(ask())
    finally:
        runner.shutdown()
    assert isinstance(error, EngineError) and error.status == 500
    assert "pair.cc" not in error.message and "29511" not in error.message and "error id" in error.message
    error_id = error.message.rsplit("error id ", 1)[1].strip(")")
    assert any(error_id in r.getMessage() and "pair.cc" in (r.exc_text or r.getMessage()) for r in caplog.records)
