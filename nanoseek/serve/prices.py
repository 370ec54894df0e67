"""DeepSeek's price table for cache-aware billing: cache-hit input, cache-miss input and output tokens, each
priced per million tokens, in exact decimals (so that the sum of per-request costs is the cost of the sums).

    nanoseek serve --model DIR --prices 0.5,2,8 --currency CNY
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

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
        if not all(p.is_finite() and p >= 0 for p in (hit, miss, out)):
            raise ValueError("prices must be finite and not negative")
        return cls(hit, miss, out, currency)

    def cost(self, hit_tokens: int, miss_tokens: int, output_tokens: int) -> Decimal:
        return (hit_tokens * self.cache_hit + miss_tokens * self.cache_miss + output_tokens * self.output) / MILLION

    def as_dict(self) -> dict:
        per = {"cache_hit_input": self.cache_hit, "cache_miss_input": self.cache_miss, "output": self.output}
        return {"currency": self.currency, "per_million_tokens": {k: float(v) for k, v in per.items()}}
