"""Cache-aware billing: DeepSeek's price table (cache-hit input, cache-miss input, output per million
tokens), per-key accounts, optional balances, a ledger on disk.

    nanoseek serve --model DIR --api-keys keys.txt --prices 0.5,2,8 --currency CNY --ledger ledger.json

Costs are exact decimals computed from token totals, so the sum of the per-request costs is the cost of
the sums. A key's balance is what it was granted (the number after it in the keys file) less what it
has spent; the ledger is rewritten atomically after every request, so a restart loses nothing.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path

MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Prices per million tokens; the default is DeepSeek-V3's launch table, in yuan."""

    cache_hit: Decimal = Decimal("0.5")
    cache_miss: Decimal = Decimal("2")
    output: Decimal = Decimal("8")
    currency: str = "CNY"

    @classmethod
    def parse(cls, prices: str, currency: str = "CNY") -> PriceTable:
        """'HIT,MISS,OUTPUT' per million tokens, e.g. '0.5,2,8'."""
        parts = prices.split(",")
        try:
            hit, miss, out = (Decimal(p.strip()) for p in parts)
        except Exception as e:
            raise ValueError(f"--prices takes three numbers HIT,MISS,OUTPUT per million tokens, got {prices!r}") from e
        if min(hit, miss, out) < 0:
            raise ValueError("prices cannot be negative")
        return cls(hit, miss, out, currency)

    def cost(self, hit_tokens: int, miss_tokens: int, output_tokens: int) -> Decimal:
        return (hit_tokens * self.cache_hit + miss_tokens * self.cache_miss + output_tokens * self.output) / MILLION

    def as_dict(self) -> dict:
        per = {"cache_hit_input": self.cache_hit, "cache_miss_input": self.cache_miss, "output": self.output}
        return {"currency": self.currency, "per_million_tokens": {k: float(v) for k, v in per.items()}}


@dataclass(slots=True)
class Account:
    requests: int = 0
    prompt_cache_hit_tokens: int = 0
    prompt_cache_miss_tokens: int = 0
    completion_tokens: int = 0
    granted: str | None = None  # a balance, as a decimal string; None: unlimited

    def cost(self, prices: PriceTable) -> Decimal:
        return prices.cost(self.prompt_cache_hit_tokens, self.prompt_cache_miss_tokens, self.completion_tokens)

    def balance(self, prices: PriceTable) -> Decimal | None:
        return None if self.granted is None else Decimal(self.granted) - self.cost(prices)


@dataclass
class Ledger:
    prices: PriceTable = field(default_factory=PriceTable)
    path: Path | None = None
    accounts: dict[str, Account] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        if self.path is not None and Path(self.path).is_file():
            try:
                saved = json.loads(Path(self.path).read_text())
                self.accounts = {key: Account(**value) for key, value in saved["accounts"].items()}
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"the ledger {self.path} is not a nanoseek ledger ({e}); move it aside") from e

    def grant(self, key: str, balance: Decimal | None) -> None:
        """Set a key's balance (from the keys file); accounts keep their spending."""
        account = self.accounts.setdefault(key, Account())
        account.granted = None if balance is None else str(balance)

    def charge(self, key: str, hit: int, miss: int, output: int) -> Decimal:
        """Record one request's tokens; returns its cost."""
        with self._lock:
            account = self.accounts.setdefault(key, Account())
            account.requests += 1
            account.prompt_cache_hit_tokens += hit
            account.prompt_cache_miss_tokens += miss
            account.completion_tokens += output
            self._save()
        return self.prices.cost(hit, miss, output)

    def can_spend(self, key: str) -> bool:
        account = self.accounts.get(key)
        balance = account.balance(self.prices) if account else None
        return balance is None or balance > 0

    def summary(self, key: str) -> dict:
        account = self.accounts.get(key, Account())
        balance = account.balance(self.prices)
        usage = {k: v for k, v in asdict(account).items() if k != "granted"}
        return {
            "object": "billing.summary",
            **self.prices.as_dict(),
            "usage": usage,
            "cost": float(account.cost(self.prices)),
            "balance": None if balance is None else float(balance),
        }

    def _save(self) -> None:
        if self.path is None:
            return
        path = Path(self.path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"accounts": {k: asdict(a) for k, a in self.accounts.items()}}, indent=1))
        os.replace(tmp, path)


def read_api_keys(path: str | Path) -> dict[str, Decimal | None]:
    """One key per line, optionally followed by its balance; '#' starts a comment."""
    keys: dict[str, Decimal | None] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise ValueError(f"{path}:{number}: expected 'KEY [BALANCE]', got {line!r}")
        try:
            keys[fields[0]] = Decimal(fields[1]) if len(fields) == 2 else None
        except Exception as e:
            raise ValueError(f"{path}:{number}: the balance {fields[1]!r} is not a number") from e
    if not keys:
        raise ValueError(f"{path} lists no API keys")
    return keys
