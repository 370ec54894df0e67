"""The engine behind an asyncio server: one thread owns the Engine and steps it; requests talk to it
through a command queue, and each step's outputs go back to the requests' asyncio queues.

The Engine is not thread-safe and need not be: only the engine thread touches it (as vLLM's
AsyncLLMEngine keeps one engine loop). A request that goes away (a client that disconnects) sends a
cancel, and its sequence leaves the batch at the next step, freeing its cache blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import uuid
from dataclasses import dataclass

from nanoseek.serve.engine import Engine, RequestOutput
from nanoseek.serve.launch import LaunchLost
from nanoseek.serve.sampling import SamplingParams

log = logging.getLogger("nanoseek.serve")


@dataclass(slots=True)
class EngineError:
    """Sent instead of an output when the engine refused or failed a request: 500, or 503 when the engine
    can no longer generate at all (a torchrun launch that lost a rank)."""

    request_id: str
    message: str
    status: int = 500


def log_failure(what: str, trace: bool | BaseException = True) -> str:
    """Log a failure with its details under a fresh id, which is all the client is told (an exception's text
    can hold source paths, hosts and ports: a gloo error once reached a 500 body). trace: True for the
    exception being handled, or the exception itself."""
    error_id = uuid.uuid4().hex[:12]
    log.error("%s (error id %s)", what, error_id, exc_info=trace)
    return error_id


def internal_error(request_id: str, error_id: str) -> EngineError:
    return EngineError(request_id, f"internal engine error: the server's log has the details (error id {error_id})")


class AsyncEngine:
    def __init__(self, engine: Engine):  # or serve/parallel.py's DataParallelFront, which has its API
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Requests submitted and not yet finished (running, waiting or about to be added)."""
        return len(self._streams)

    @property
    def failed(self) -> str | None:
        """Why the engine can no longer generate (None while it can)."""
        return self.engine.failed

    def submit(self, ids: list[int], params: SamplingParams, cache_salt: str | None, out: asyncio.Queue) -> str:
        """Start a request; its RequestOutput snapshots (or an EngineError) arrive on `out`."""
        request_id = f"req-{next(self._ids)}"
        self._streams[request_id] = (asyncio.get_running_loop(), out)
        if self.failed is not None:
            out.put_nowait(EngineError(request_id, self.failed, 503))
            self._streams.pop(request_id)
            return request_id
        self._commands.put(("add", request_id, ids, params, cache_salt))
        return request_id

    def cancel(self, request_id: str) -> None:
        self._commands.put(("cancel", request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(("stop",))
        self._thread.join()
        self.engine.close()

    # --- the engine thread -----------------------------------------------------------------------
    def _send(self, request_id: str, item: RequestOutput | EngineError, last: bool) -> None:
        target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is None:
            return
        loop, out = target
        with contextlib.suppress(RuntimeError):  # the request's event loop is gone
            loop.call_soon_threadsafe(out.put_nowait, item)

    def _handle(self, command: tuple) -> None:
        kind, *args = command
        if kind == "add":
            request_id, ids, params, salt = args
            if request_id not in self._streams:  # cancelled before it was added
                return
            if self.failed is not None:
                self._send(request_id, EngineError(request_id, self.failed, 503), last=True)
                return
            try:
                self.engine.add_request(ids, params, request_id=request_id, cache_salt=salt)
            except ValueError as e:
                self._send(request_id, EngineError(request_id, str(e)), last=True)
        elif kind == "cancel":
            (request_id,) = args
            if self.failed is None:
                self.engine.cancel(request_id)
            self._streams.pop(request_id, None)

    def _fail_all(self, message: str) -> None:
        """The engine can no longer generate: every request in flight, and any that arrives, gets a 503."""
        for request_id in list(self._streams):
            self._send(request_id, EngineError(request_id, message, 503), last=True)

    def _run(self) -> None:
        engine = self.engine
        while not self._stopped:
            waits = engine.failed is not None or not engine.has_work()
            try:  # wait for work when idle (a front's heartbeat aside), else only look at what has arrived
                command = self._commands.get(block=waits, timeout=engine.heartbeat_s if waits else None)
            except queue.Empty:
                command = None
            while command is not None:
                try:
                    self._handle(command)
                except Exception:  # one request's command: it fails alone, the engine goes on
                    error_id = log_failure(f"engine command {command[0]} failed")
                    if command[0] == "add":
                        self._send(command[1], internal_error(command[1], error_id), last=True)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if engine.failed is not None:
                self._fail_all(engine.failed)
                continue
            try:
                if not engine.has_work():
                    engine.idle()
                    continue
                outputs = engine.step()
            except LaunchLost as e:
                self._fail_all(str(e))
                continue
            except Exception:  # a bug, not a request's fault: fail what is running, keep serving
                error_id = log_failure("engine step failed")
                for request_id in list(engine.sequences):
                    engine.cancel(request_id)
                    self._send(request_id, internal_error(request_id, error_id), last=True)
                continue
            for output in outputs:
                if output.finish_reason == "error":
                    error_id = log_failure(f"request {output.request_id} failed: {output.error}", trace=False)
                    self._send(output.request_id, internal_error(output.request_id, error_id), last=True)
                else:
                    self._send(output.request_id, output, last=output.finish_reason is not None)
