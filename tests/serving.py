"""Helpers for the server tests: a small model folder, the app in this process (reached through httpx's ASGI
transport), and a real `nanoseek serve` process on a free port, for the tests that kill a server or share one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import torch

from nanoseek import Transformer, get_preset, save_pretrained

if TYPE_CHECKING:
    import openai

    from nanoseek.serve.config import ServeConfig
    from nanoseek.serve.engine import Engine


def make_model_dir(out: Path, tokenizer, layers: int = 2) -> Path:
    """A random tiny model whose greedy decoding never picks EOS (its output row is zero while the best of
    the others is positive), so a generation runs to max_tokens unless it is cancelled."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(vocab_size=tokenizer.vocab_size, num_hidden_layers=layers))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id] = 0
    save_pretrained(model, out)
    tokenizer.save(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcess:
    """`create_app` in this process, reached through httpx's ASGI transport: no port, no subprocess, one event
    loop with the test. The transport runs no lifespan: `async with` runs the app's (whose shutdown closes
    the engine thread and the ledger). A response comes back whole, streams too: a test that holds a stream
    open runs its request as a task and cancels it to leave, as a client that hangs up."""

    base_url = "http://nanoseek"

    def __init__(self, cfg: ServeConfig, engine: Engine | None = None):
        from nanoseek.serve.api import create_app  # imported here: the subprocess tests need no server code

        self.app = create_app(cfg, engine)

    def client(self, key: str | None = None, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
        """raise_app_exceptions=False: an exception that escapes the app reaches the test as the server's 500
        response, as a client over the network would see it (by default it is raised in the test)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=raise_app_exceptions)
        return httpx.AsyncClient(transport=transport, base_url=self.base_url, headers=headers, timeout=60)

    def openai(self, key: str, prefix: str = "/v1") -> openai.AsyncOpenAI:
        import openai

        return openai.AsyncOpenAI(
            base_url=self.base_url + prefix, api_key=key, max_retries=0, timeout=60, http_client=self.client()
        )

    async def __aenter__(self) -> InProcess:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._lifespan.__aexit__(*exc)


class Server:
    """`python -m nanoseek serve ...` in a subprocess, stopped with SIGTERM (a graceful shutdown)."""

    def __init__(
        self,
        model_dir: Path,
        *args: str,
        log: Path | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        eager: bool = True,
    ):
        """eager: --enforce-eager, so that a test server starts in a second, not after compiling buckets."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(model_dir), "--port", str(self.port), *args]
        cmd += ["--enforce-eager"] if eager else []
        self.log = open(log or os.devnull, "wb")  # noqa: SIM115 - closed in stop()
        # A ledger left to its default lands under XDG_DATA_HOME: a fresh folder, not the tester's home.
        env = {**os.environ, "XDG_DATA_HOME": tempfile.mkdtemp(prefix="nanoseek-data-"), **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError("the server did not come up in 120 s")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def kill(self) -> None:
        """kill -9: no shutdown, no flush."""
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
