"""API keys: the keys file a server reads (`KEY [BALANCE]` a line), and how the ledger names a key without
keeping it (an HMAC-SHA256 under the ledger's own secret, and the key's last characters as a hint).

    nanoseek serve --model DIR --api-keys keys.txt
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from decimal import Decimal, InvalidOperation
from pathlib import Path


def new_secret() -> str:
    """A ledger's HMAC key, as hex (kept in the ledger's `meta` table)."""
    return secrets.token_hex(32)


def key_hash(secret: bytes, key: str) -> str:
    """How a ledger names an API key: its HMAC-SHA256 under the ledger's secret, never the key."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def key_hint(key: str) -> str:
    """A key's last characters for reports: at most 4, and at most a quarter of it."""
    return key[len(key) - min(4, len(key) // 4) :]


def bearer_matches(token: str, key: str) -> bool:
    """A bearer token against a key, in constant time (no timing tells how much of it matched)."""
    return hmac.compare_digest(token.encode(), key.encode())


def read_api_keys(path: str | Path) -> dict[str, Decimal | None]:
    """One key per line, optionally followed by its balance; blank lines and '#' comments are skipped.
    Refused, naming the line: a balance that is not a finite number >= 0, a duplicate key, a key that
    an HTTP header cannot carry. A UTF-8 byte-order mark is read as such."""
    keys: dict[str, Decimal | None] = {}
    seen: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) > 2:
            raise ValueError(f"{where}: expected 'KEY [BALANCE]', got {line!r}")
        key = fields[0]
        if not (key.isascii() and key.isprintable()):
            raise ValueError(f"{where}: a key must be printable ASCII (it travels in an HTTP header)")
        if key in seen:
            raise ValueError(f"{where}: the key on line {seen[key]} appears again")
        seen[key] = number
        balance = None
        if len(fields) == 2:
            try:
                balance = Decimal(fields[1])
            except InvalidOperation:
                raise ValueError(f"{where}: the balance {fields[1]!r} is not a number") from None
            if not balance.is_finite() or balance < 0:
                raise ValueError(f"{where}: the balance {fields[1]!r} must be a finite number >= 0")
        keys[key] = balance
    if not keys:
        raise ValueError(f"{path} lists no API keys")
    return keys
