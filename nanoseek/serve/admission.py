"""Admission: who asks (API keys, the admin key), whether the server takes the request now (the model, the
load under --max-pending, the key's --max-concurrent-per-key tickets, the ledger's health), and the
reservation of its worst case against the key's balance. It owns the keys and the ledger; turning a request
into token ids and sampling parameters is preprocess.py's.

    nanoseek serve --model DIR --api-keys keys.txt [--ledger ledger.db] [--max-concurrent-per-key N]
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import Request

from nanoseek.serve import errors
from nanoseek.serve.config import ServeConfig
from nanoseek.serve.errors import ApiError
from nanoseek.serve.keys import bearer_matches, read_api_keys
from nanoseek.serve.ledger import InsufficientBalance, Ledger, LedgerUnavailable, Meter, default_ledger_path
from nanoseek.serve.prices import PriceTable
from nanoseek.serve.protocol import SamplingRequest
from nanoseek.serve.sampling import SamplingParams

ANONYMOUS = "anonymous"


class Ticket:
    """A request's place under --max-concurrent-per-key: held from admission until its last generation
    closes, or given back at once when the request fails before any starts."""

    def __init__(self, counts: dict[str, int], key: str):
        self.counts, self.key, self.holders, self.released = counts, key, 0, False
        counts[key] = counts.get(key, 0) + 1

    @contextmanager
    def released_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.release(holder=False)
            raise

    def hold(self) -> Ticket:
        self.holders += 1
        return self

    def release(self, holder: bool = True) -> None:
        self.holders -= holder
        if self.holders <= 0 and not self.released:
            self.released = True
            self.counts[self.key] -= 1


def open_ledger(cfg: ServeConfig) -> Ledger:
    """The SQLite ledger at --ledger (or its default); a JSON ledger of older nanoseek is imported once."""
    prices = PriceTable.parse(cfg.prices, cfg.currency)
    path = Path(cfg.ledger) if cfg.ledger else default_ledger_path(cfg.api_keys)
    legacy = [Path(cfg.engine.cache_dir) / "ledger.json"] if cfg.engine.cache_dir else []
    if path.suffix == ".json":  # --ledger named an old JSON ledger: keep the database beside it
        legacy.append(path)
        path = path.with_suffix(".db")
    ledger = Ledger(path, prices)
    for old in legacy:
        if ledger.import_json(old):
            print(f"imported the JSON ledger {old} into {path} (renamed to {old.name}.imported)", flush=True)
    return ledger


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class Admission:
    """pending: how many generations the engine holds now (the AsyncEngine's count)."""

    def __init__(self, cfg: ServeConfig, pending: Callable[[], int]):
        self.cfg, self.pending = cfg, pending
        self.keys = read_api_keys(cfg.api_keys) if cfg.api_keys else None
        self.ledger = open_ledger(cfg)
        try:
            self.ledger.grant(self.keys or {ANONYMOUS: None})
        except BaseException:
            self.ledger.close()
            raise
        self.in_flight: dict[str, int] = {}  # requests per key, for --max-concurrent-per-key

    def close(self) -> None:
        self.ledger.close()  # after the usage of the last requests is written

    # --- who asks, and may they ------------------------------------------------------------------
    def authenticate(self, request: Request) -> str:
        """The caller's API key (a FastAPI dependency); 401 without a valid one."""
        if self.keys is None:
            return ANONYMOUS
        token = bearer_token(request)
        if token is None or token not in self.keys:
            raise errors.invalid_api_key()
        return token

    def authorize_admin(self, request: Request) -> None:
        """Every tenant's traffic (/metrics): open without --api-keys, else for the --admin-key only."""
        if self.keys is None:
            return
        if self.cfg.admin_key is None:
            raise errors.admin_only()
        token = bearer_token(request)
        if token is None or not bearer_matches(token, self.cfg.admin_key):
            raise errors.invalid_admin_key()

    # --- may the server take it now ----------------------------------------------------------------
    def admit(self, body: SamplingRequest, requests: int, key: str) -> Ticket:
        """The checks that need no tokens and no database: model, size, the ledger's health, load. The ticket
        goes to the request's generations; a request that fails before them releases it."""
        cfg = self.cfg
        if body.model not in cfg.names:
            raise errors.model_not_found(body.model, cfg.names)
        if requests > cfg.max_pending:
            raise errors.too_many_generations(requests, cfg.max_pending)
        if self.ledger.unavailable is not None:
            raise errors.ledger_unavailable(self.ledger.unavailable)
        if self.pending() + requests > cfg.max_pending:
            raise errors.server_busy(cfg.max_pending)
        limit = cfg.max_concurrent_per_key
        if limit and key != ANONYMOUS and self.in_flight.get(key, 0) >= limit:
            raise errors.key_concurrency_limit(limit)
        return Ticket(self.in_flight, key)

    async def reserve(self, key: str, jobs: list[tuple[list[int], list[SamplingParams]]]) -> list[Meter]:
        """Reserve each prompt's worst case against the key's balance (in the ledger's transaction, off the
        loop); all or none."""
        meters: list[Meter] = []
        try:
            for ids, params in jobs:
                worst = sum(p.max_tokens for p in params)
                meters.append(await asyncio.to_thread(self.ledger.open, key, len(ids), worst))
        except BaseException as e:  # also a client gone (cancelled) mid-way
            for meter in meters:  # release what the earlier prompts reserved
                meter.close()
            if isinstance(e, LedgerUnavailable):
                raise errors.ledger_unavailable(str(e)) from None
            if isinstance(e, InsufficientBalance):
                raise ApiError(402, str(e), type="insufficient_balance", code="insufficient_balance") from None
            raise
        return meters
