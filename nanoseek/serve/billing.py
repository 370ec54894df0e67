"""Cache-aware billing: DeepSeek's price table (cache-hit input, cache-miss input, output per million
tokens), per-key accounts with optional balances, and a ledger in SQLite that server processes share.

    nanoseek serve --model DIR --api-keys keys.txt --prices 0.5,2,8 --currency CNY [--ledger ledger.db]
    nanoseek ledger --ledger keys.ledger.db [--csv]

Money is never spent twice and never left unrecorded:
- Admission reserves a request's worst case (prompt at the cache-miss price + n x max_tokens at the output
  price) in the same transaction that checks the balance less every open reservation, so a burst of
  concurrent requests can never spend more than the balance. The real cost settles the reservation.
- Usage is recorded as it is delivered: each request is a `Meter` whose totals the writer thread writes
  as one usage row per change (all meters that changed in one transaction), so a killed server loses
  only what it delivered in the last moments. When the database cannot be written (a full or read-only
  disk), the server refuses new billed requests with a 503 (`Ledger.unavailable` says why), keeps the
  unwritten usage in memory and writes it when the database takes writes again.
- SQLite in WAL mode with a busy timeout: several processes can serve from one ledger. A reservation
  left by a process that died (kill -9) is dropped once that process is gone.

Costs are exact decimals computed from token totals, so the sum of the per-request costs is the cost of
the sums.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from nanoseek.serve.config import LedgerConfig

log = logging.getLogger("nanoseek.serve")
MILLION = Decimal(1_000_000)
WRITE_EVERY = 0.01  # seconds between the writer's transactions: a killed server loses at most this much usage
SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    key TEXT PRIMARY KEY, granted TEXT, requests INTEGER NOT NULL DEFAULT 0,
    hit INTEGER NOT NULL DEFAULT 0, miss INTEGER NOT NULL DEFAULT 0, output INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL, request TEXT NOT NULL, time REAL NOT NULL,
    hit INTEGER NOT NULL, miss INTEGER NOT NULL, output INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, amount TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS reservations_by_key ON reservations (key);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
GRANT = """
INSERT INTO accounts (key, granted) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET granted = excluded.granted
"""
OPEN_ACCOUNT = "INSERT INTO accounts (key, granted) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"
ADD_USAGE = """
UPDATE accounts SET requests = requests + ?, hit = hit + ?, miss = miss + ?, output = output + ?
WHERE key = ?
"""
INSERT_USAGE = "INSERT INTO usage (key, request, time, hit, miss, output) VALUES (?, ?, ?, ?, ?, ?)"
INSERT_RESERVATION = "INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?)"
RESERVING_PIDS = "SELECT DISTINCT pid FROM reservations WHERE host = ?"
# An account's totals in the JSON ledger of nanoseek before SQLite, in the order of ADD_USAGE.
JSON_TOTALS = ("requests", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "completion_tokens")


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


@dataclass(slots=True)
class Account:
    key: str
    granted: Decimal | None = None  # None: unlimited
    requests: int = 0
    hit: int = 0
    miss: int = 0
    output: int = 0
    reserved: Decimal = Decimal(0)  # open reservations

    def cost(self, prices: PriceTable) -> Decimal:
        return prices.cost(self.hit, self.miss, self.output)

    def balance(self, prices: PriceTable) -> Decimal | None:
        return None if self.granted is None else self.granted - self.cost(prices)

    def can_afford(self, prices: PriceTable, amount: Decimal) -> bool:
        balance = self.balance(prices)
        return balance is None or balance - self.reserved >= amount


class InsufficientBalance(Exception):
    pass


class LedgerUnavailable(Exception):
    """The ledger cannot be written now; billed requests must wait."""


class Meter:
    """One request's usage as delivered so far; `Ledger` writes what changed."""

    def __init__(self, ledger: Ledger, key: str, reservation: str | None):
        self.ledger, self.key, self.reservation = ledger, key, reservation
        self.request = uuid.uuid4().hex
        self.delivered = self.recorded = (0, 0, 0)  # (cache-hit, cache-miss, output) tokens
        self.closed = self.settled = False

    def deliver(self, hit: int, miss: int, output: int) -> None:
        """The totals delivered to the client so far (they only grow)."""
        self.delivered = tuple(max(a, b) for a, b in zip(self.delivered, (hit, miss, output), strict=True))
        self.ledger.mark(self)

    def close(self) -> None:
        """The request is over: record the rest and release its reservation."""
        self.closed = True
        self.ledger.mark(self)


class Ledger:
    def __init__(self, path: str | Path | None = None, prices: PriceTable | None = None):
        self.prices = prices or PriceTable()
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._db = sqlite3.connect(
            ":memory:" if self.path is None else self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._lock = threading.RLock()
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # committed rows survive a killed process
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not a nanoseek ledger (SQLite said: {e}); move it aside") from e
        self.unavailable: str | None = None  # why the ledger cannot be written now
        self._dirty: dict[int, Meter] = {}
        self._drop_dead_reservations()
        self._wake = threading.Condition()
        self._stopped = False
        self._writer = threading.Thread(target=self._write_loop, name="nanoseek-ledger", daemon=True)
        self._writer.start()

    # --- transactions ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # also a COMMIT that failed: never leave the transaction open
                    self._db.execute("ROLLBACK")
                raise

    def _write(self, fn, *args):
        """Run a write transaction; a database that refuses writes makes the ledger unavailable."""
        try:
            with self._transaction() as db:
                result = fn(db, *args)
        except sqlite3.DatabaseError as e:
            self.unavailable = f"the billing ledger cannot be written ({e})"
            raise LedgerUnavailable(self.unavailable) from e
        self.unavailable = None  # a transaction went through: the database takes writes again
        return result

    def _account(self, db: sqlite3.Connection, key: str) -> Account:
        row = db.execute("SELECT granted, requests, hit, miss, output FROM accounts WHERE key = ?", (key,)).fetchone()
        account = Account(key) if row is None else Account(key, None if row[0] is None else Decimal(row[0]), *row[1:])
        amounts = db.execute("SELECT amount FROM reservations WHERE key = ?", (key,)).fetchall()
        account.reserved = sum((Decimal(a) for (a,) in amounts), Decimal(0))
        return account

    def _drop_dead_reservations(self) -> None:
        """Reservations of this host's processes that no longer run (a server killed mid-request)."""
        with self._lock:
            pids = [p for (p,) in self._db.execute(RESERVING_PIDS, (self.host,))]
        dead = [p for p in pids if p != self.pid and not _alive(p)]
        if dead:
            with self._transaction() as db:
                db.executemany("DELETE FROM reservations WHERE host = ? AND pid = ?", [(self.host, p) for p in dead])

    # --- accounts ----------------------------------------------------------------------------------
    def grant(self, balances: dict[str, Decimal | None]) -> None:
        """Set keys' balances (from the keys file); accounts keep their spending."""

        def upsert(db):
            db.executemany(GRANT, [(k, None if b is None else str(b)) for k, b in balances.items()])

        self._write(upsert)

    def account(self, key: str, settled: bool = False) -> Account:
        """A key's account; settled=True first waits (up to a second) for the usage still being written."""
        if settled:
            self.flush(timeout=1.0)
        with self._lock:
            return self._account(self._db, key)

    def accounts(self) -> list[Account]:
        with self._lock:
            keys = [k for (k,) in self._db.execute("SELECT key FROM accounts ORDER BY key")]
            return [self._account(self._db, k) for k in keys]

    def minimal_cost(self) -> Decimal:
        """The cost of the smallest request: one prompt token, one output token."""
        return self.prices.cost(0, 1, 1)

    def summary(self, key: str) -> dict:
        account = self.account(key, settled=True)
        balance = account.balance(self.prices)
        usage = {
            "requests": account.requests,
            "prompt_cache_hit_tokens": account.hit,
            "prompt_cache_miss_tokens": account.miss,
            "completion_tokens": account.output,
        }
        return {
            "object": "billing.summary",
            **self.prices.as_dict(),
            "usage": usage,
            "cost": float(account.cost(self.prices)),
            "balance": None if balance is None else float(balance),
            "reserved": float(account.reserved),
        }

    # --- requests ----------------------------------------------------------------------------------
    def open(self, key: str, prompt_tokens: int, max_output_tokens: int) -> Meter:
        """Admit a request: reserve its worst case against the key's balance, or raise InsufficientBalance
        (or LedgerUnavailable). Blocking: call it off the event loop."""
        self._retry_unwritten()
        worst = self.prices.cost(0, prompt_tokens, max_output_tokens)

        def reserve(db):
            account = self._account(db, key)
            if account.granted is None:
                return None
            if not account.can_afford(self.prices, worst):
                left = account.balance(self.prices) - account.reserved
                raise InsufficientBalance(
                    f"this key's balance ({max(left, Decimal(0)):.6f} {self.prices.currency} after open requests) "
                    f"cannot cover this request's worst case ({worst:.6f}: {prompt_tokens} prompt tokens and "
                    f"{max_output_tokens} output tokens): top it up, or lower max_tokens"
                )
            reservation = uuid.uuid4().hex
            db.execute(INSERT_RESERVATION, (reservation, key, str(worst), self.host, self.pid, time.time()))
            return reservation

        return Meter(self, key, self._write(reserve))

    def mark(self, meter: Meter) -> None:
        with self._wake:
            self._dirty[id(meter)] = meter
            self._wake.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every delivered token is written (False if the ledger cannot be written)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._dirty and time.monotonic() < deadline:
                self._wake.wait(0.05)
            return not self._dirty

    def close(self) -> None:
        self.flush()
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._writer.join()

    def _retry_unwritten(self) -> None:
        """While the ledger is failing, admission waits (up to a second) for the writer's next attempt."""
        if self.unavailable is not None:
            with self._wake:
                self._wake.notify()
            deadline = time.monotonic() + 1.0
            while self.unavailable is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.unavailable is not None:
                raise LedgerUnavailable(self.unavailable)

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while not self._dirty and not self._stopped:
                    self._wake.wait()
                if not self._dirty:
                    return
                meters = list(self._dirty.values())
            snapshot = [(m, m.delivered, m.closed) for m in meters]  # the event loop keeps moving them
            try:
                self._write(self._record, snapshot)
            except Exception as e:  # a full or read-only disk, or worse: keep the usage, retry
                if not isinstance(e, LedgerUnavailable):
                    log.exception("the ledger writer failed")
                    self.unavailable = f"the billing ledger cannot be written ({e})"
                if self._stopped:  # shutting down: say what could not be written, do not hang
                    log.error("unwritten usage at shutdown: %s", [(m.key, m.delivered) for m in meters])
                    return
                time.sleep(0.5)
                continue
            for m, delivered, closed in snapshot:  # only now, with the transaction committed
                m.recorded, m.settled = delivered, closed
            with self._wake:
                for m in meters:
                    if m.recorded == m.delivered and (m.settled or not m.closed):
                        self._dirty.pop(id(m), None)
                self._wake.notify_all()
            time.sleep(WRITE_EVERY)  # changes that arrive meanwhile share the next transaction

    def _record(self, db: sqlite3.Connection, snapshot: list[tuple[Meter, tuple[int, int, int], bool]]) -> None:
        """One usage row per meter that delivered more, the account totals, settled reservations."""
        now = time.time()
        for m, delivered, closed in snapshot:
            hit, miss, out = (a - b for a, b in zip(delivered, m.recorded, strict=True))
            if hit or miss or out:
                first = m.recorded == (0, 0, 0)
                db.execute(INSERT_USAGE, (m.key, m.request, now, hit, miss, out))
                db.execute("INSERT INTO accounts (key) VALUES (?) ON CONFLICT (key) DO NOTHING", (m.key,))
                db.execute(ADD_USAGE, (int(first), hit, miss, out, m.key))
            if closed and m.reservation is not None:
                db.execute("DELETE FROM reservations WHERE id = ?", (m.reservation,))

    # --- the old JSON ledger -----------------------------------------------------------------------
    def import_json(self, path: str | Path) -> bool:
        """Take over the accounts of a JSON ledger (nanoseek before SQLite) once; the file is renamed."""
        path = Path(path)
        if not path.is_file():
            return False
        try:
            accounts = json.loads(path.read_text())["accounts"]
            rows = [(k, a.get("granted"), *(int(a[total]) for total in JSON_TOTALS)) for k, a in accounts.items()]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a nanoseek JSON ledger ({e}); move it aside") from e

        def take(db):
            if db.execute("SELECT 1 FROM meta WHERE name = ?", (f"imported:{path.resolve()}",)).fetchone():
                return
            for key, granted, requests, hit, miss, out in rows:
                db.execute(OPEN_ACCOUNT, (key, granted))
                db.execute(ADD_USAGE, (requests, hit, miss, out, key))
                db.execute(INSERT_USAGE, (key, f"imported:{path.name}", time.time(), hit, miss, out))
            db.execute("INSERT INTO meta VALUES (?, ?)", (f"imported:{path.resolve()}", str(time.time())))

        self._write(take)
        path.rename(path.with_name(path.name + ".imported"))
        return True


def usage_report(ledger: Ledger, as_csv: bool = False) -> str:
    """Every account's usage, cost, balance and open reservations: a table, or CSV for a spreadsheet."""
    import csv
    import io

    head = [
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
        balance = a.balance(ledger.prices)
        rows.append(
            [
                a.key,
                a.requests,
                a.hit,
                a.miss,
                a.output,
                f"{a.cost(ledger.prices):.6f}",
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_ledger_path(api_keys: str | None) -> Path:
    """Beside the keys file (billing belongs with the keys, never in a disposable cache), else under the
    user's data directory."""
    if api_keys:
        keys = Path(api_keys)
        return keys.with_name(keys.stem + ".ledger.db")
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "nanoseek" / "ledger.db"


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
