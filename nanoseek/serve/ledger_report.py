"""`nanoseek ledger`: every API key's usage, recorded cost, balance and open reservations, from the SQLite
ledger that `nanoseek serve` writes, as a table or as CSV for a spreadsheet.

    nanoseek ledger --ledger keys.ledger.db [--csv]
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from nanoseek.serve.config import LedgerConfig
from nanoseek.serve.ledger import Ledger
from nanoseek.serve.prices import PriceTable


def usage_report(ledger: Ledger, as_csv: bool = False) -> str:
    """Every account's usage, recorded cost, balance and open reservations: a table, or CSV for a
    spreadsheet. An account shows as its HMAC's first characters and its key's last ones."""
    head = [
        "account",
        "key",
        "requests",
        "cache_hit_tokens",
        "cache_miss_tokens",
        "output_tokens",
        f"cost_{ledger.prices.currency}",
        "balance",
        "reserved",
    ]
    rows = []
    for a in ledger.accounts():
        balance = a.balance()
        rows.append(
            [
                a.key[:8],
                f"...{a.hint}",
                a.requests,
                a.hit,
                a.miss,
                a.output,
                f"{a.cost:.6f}",
                "unlimited" if balance is None else f"{balance:.6f}",
                f"{a.reserved:.6f}",
            ]
        )
    if as_csv:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([head, *rows])
        return out.getvalue()
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return (
        "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows])
        + "\n"
    )


def print_ledger(cfg: LedgerConfig) -> int:
    """`nanoseek ledger`: the usage report of a serving ledger, as a table or CSV."""
    if not Path(cfg.ledger).is_file():
        raise FileNotFoundError(f"no ledger at {cfg.ledger}: pass the --ledger file `nanoseek serve` writes")
    ledger = Ledger(cfg.ledger, PriceTable.parse(cfg.prices, cfg.currency))
    try:
        print(usage_report(ledger, as_csv=cfg.csv), end="")
    finally:
        ledger.close()
    return 0
