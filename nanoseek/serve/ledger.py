"""The billing ledger: per-key accounts with optional balances, reservations and usage in SQLite, which
server processes share. Prices are prices.py's; the keys file and key hashing are keys.py's; the report of
`nanoseek ledger` is ledger_report.py's.

    nanoseek serve --model DIR --api-keys keys.txt [--ledger ledger.db]

Money is never spent twice and never left unrecorded:
- Admission reserves a request's worst case (prompt at the cache-miss price + n x max_tokens at the output
  price) in the same transaction that checks the balance less what open requests may still spend (each
  reservation less what its request has delivered, which the balance already counts), so a burst of
  concurrent requests can never spend more than the balance. The real cost settles the reservation.
- Usage is recorded as it is delivered: each request is a `Meter` whose totals the writer thread writes
  as one usage row per change (all meters that changed in one transaction), so a killed server loses
  only what it delivered in the last moments. When the database cannot be written (a full or read-only
  disk), the server refuses new billed requests with a 503 (`Ledger.unavailable` says why), keeps the
  unwritten usage in memory and writes it when the database takes writes again. A ledger file removed
  or replaced while serving is unavailable until a restart: its writes would reach a file no one reads.
- Each usage row and account records its cost at the prices in force when the request ran: new --prices
  price later requests, never earlier ones; the balance is the grant less the recorded cost.
- SQLite in WAL mode with a busy timeout: several processes, on several hosts, can serve from one ledger.
  A reservation belongs to its process's lease, which the writer renews every RENEW_EVERY seconds for
  LEASE_SECONDS: once the lease of a process that died (kill -9, a lost host) lapses, no process counts
  its reservations, and the next transaction that looks deletes them (the hosts' clocks must agree).
- The ledger holds no API key: an account is found by the key's HMAC-SHA256 under a random secret of the
  ledger (in `meta`), and keeps the key's last characters as a hint for reports. Its files are 0600.
- An older ledger is brought up to date when opened: its keys are hashed, and its past usage is priced
  once, at the prices of the process that opens it (`meta` says so and at which prices).

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
from decimal import Decimal
from pathlib import Path

from nanoseek.serve.keys import key_hash, key_hint, new_secret
from nanoseek.serve.prices import PriceTable

log = logging.getLogger("nanoseek.serve")
WRITE_EVERY = 0.01  # seconds between the writer's transactions: a killed server loses at most this much usage
LEASE_SECONDS = 15.0  # a process's reservations lapse this long after its last renewal
RENEW_EVERY = 5.0  # the writer renews its lease this often: two renewals can fail before it lapses
# `key` holds the HMAC of an API key, never the key; costs are Decimal strings; a reservation's `used` is
# what its request has delivered so far (already in the account's cost).
SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    key TEXT PRIMARY KEY, granted TEXT, requests INTEGER NOT NULL DEFAULT 0,
    hit INTEGER NOT NULL DEFAULT 0, miss INTEGER NOT NULL DEFAULT 0, output INTEGER NOT NULL DEFAULT 0,
    hint TEXT NOT NULL DEFAULT '', cost TEXT NOT NULL DEFAULT '0');
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL, request TEXT NOT NULL, time REAL NOT NULL,
    hit INTEGER NOT NULL, miss INTEGER NOT NULL, output INTEGER NOT NULL, cost TEXT NOT NULL DEFAULT '0');
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, amount TEXT NOT NULL, owner TEXT NOT NULL, time REAL NOT NULL,
    used TEXT NOT NULL DEFAULT '0');
CREATE INDEX IF NOT EXISTS reservations_by_key ON reservations (key);
CREATE INDEX IF NOT EXISTS reservations_by_owner ON reservations (owner);
CREATE TABLE IF NOT EXISTS leases (owner TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
GRANT = """
INSERT INTO accounts (key, hint, granted) VALUES (?, ?, ?)
ON CONFLICT (key) DO UPDATE SET granted = excluded.granted
"""
OPEN_ACCOUNT = "INSERT INTO accounts (key, hint, granted) VALUES (?, ?, ?) ON CONFLICT (key) DO NOTHING"
ADD_USAGE = """
UPDATE accounts SET requests = requests + ?, hit = hit + ?, miss = miss + ?, output = output + ?,
    cost = add_decimal(cost, ?)
WHERE key = ?
"""
INSERT_USAGE = "INSERT INTO usage (key, request, time, hit, miss, output, cost) VALUES (?, ?, ?, ?, ?, ?, ?)"
INSERT_RESERVATION = "INSERT INTO reservations (id, key, amount, owner, time) VALUES (?, ?, ?, ?, ?)"
LIVE_RESERVATIONS = "SELECT amount, used FROM reservations JOIN leases USING (owner) WHERE key = ? AND expires > ?"
RENEW_LEASE = "INSERT INTO leases VALUES (?, ?) ON CONFLICT (owner) DO UPDATE SET expires = excluded.expires"
# SQLite's result codes (extended ones start with these) that say a file cannot be written, not that it is
# no ledger: a read-only file, folder or disk, a full disk.
UNWRITABLE = ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_PERM", "SQLITE_AUTH")
# Why the ledger is unavailable, as clients and /health are told (the log has the path and SQLite's words).
CANNOT_WRITE = "the billing ledger cannot be written"
CANNOT_READ = "the billing ledger cannot be read"
LOST = "the billing ledger was removed or replaced while serving"
# An account's totals in the JSON ledger of nanoseek before SQLite, in the order of ADD_USAGE.
JSON_TOTALS = ("requests", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "completion_tokens")


@dataclass(slots=True)
class Account:
    key: str  # the API key's HMAC in this ledger, never the key
    hint: str = ""  # the key's last characters, for reports
    granted: Decimal | None = None  # None: unlimited
    requests: int = 0
    hit: int = 0
    miss: int = 0
    output: int = 0
    cost: Decimal = Decimal(0)  # as recorded: each request at the prices in force when it ran
    reserved: Decimal = Decimal(0)  # what open requests may still spend beyond what they delivered

    def balance(self) -> Decimal | None:
        return None if self.granted is None else self.granted - self.cost

    def can_afford(self, amount: Decimal) -> bool:
        balance = self.balance()
        return balance is None or balance - self.reserved >= amount


class InsufficientBalance(Exception):
    pass


class LedgerUnavailable(Exception):
    """The ledger cannot be written now; billed requests must wait."""


class Meter:
    """One request's usage as delivered so far; `Ledger` writes what changed."""

    def __init__(self, ledger: Ledger, key: str, reservation: str | None):
        self.ledger, self.key, self.reservation = ledger, key, reservation  # key: the account's HMAC
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
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # its lease's name
        self._lock = threading.RLock()
        self._secret = b""  # the HMAC key of API keys, read from `meta` in _prepare
        self._db: sqlite3.Connection | None = None
        try:
            migrated = self._open()
        except (OSError, sqlite3.DatabaseError) as e:
            if self._db is not None:
                self._db.close()
            raise self._refusal(e) from e
        if migrated:  # the old pages, plaintext keys included, leave the WAL and the file
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._file = None if self.path is None else _identity(self.path)
        self._failing: str | None = None  # why the database refuses writes now (a full or read-only disk)
        self._lost: str | None = None  # why it never takes any again (its file went)
        self._lost_lock = threading.Lock()  # not self._lock, which a transaction holds: the event loop asks
        self._dirty: dict[int, Meter] = {}
        self._wake = threading.Condition()
        self._stopped = False
        self._renew_at = time.monotonic() + RENEW_EVERY
        self._writer = threading.Thread(target=self._write_loop, name="nanoseek-ledger", daemon=True)
        self._writer.start()

    def _open(self) -> bool:
        """Open (or create) the database, 0600, in WAL mode, and prepare it; True if it was migrated."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _private(self.path)
        self._db = sqlite3.connect(
            ":memory:" if self.path is None else self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        for name, arity, fn in (
            ("add_decimal", 2, lambda a, b: str(Decimal(a) + Decimal(b))),
            ("price", 3, lambda hit, miss, out: str(self.prices.cost(hit, miss, out))),
            ("key_hash", 1, self._hash),
            ("key_hint", 1, key_hint),
        ):
            self._db.create_function(name, arity, fn, deterministic=True)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # committed rows survive a killed process
        self._db.execute("PRAGMA secure_delete=ON")  # what is replaced (a plaintext key) is zeroed, not left over
        with self._transaction() as db:  # one process migrates; the others find it done
            return self._prepare(db)

    def _refusal(self, e: OSError | sqlite3.DatabaseError) -> ValueError:
        """Why the ledger cannot be opened, for the one line a start-up error prints: a file, folder or disk
        that takes no writes (what to do about it), or a file that is no ledger."""
        if isinstance(e, OSError):  # a read-only file, folder or disk: not even opened for writing
            return unwritable(self.path, e.strerror or str(e))
        name = getattr(e, "sqlite_errorname", "") or ""
        if name == "SQLITE_READONLY_DIRECTORY":
            folder = f"its folder takes no new files, and SQLite keeps {self.path.name}-wal and -shm beside it"
            return unwritable(self.path, folder)
        if name.startswith(UNWRITABLE):
            return unwritable(self.path, f"SQLite said: {e}")
        return ValueError(f"{self.path} is not a nanoseek ledger (SQLite said: {e}); move it aside")

    def _prepare(self, db: sqlite3.Connection) -> bool:
        """Create the tables, take a lease, and bring a ledger of an older nanoseek up to date (its keys
        hashed, its usage priced at this process's prices); True if it was migrated."""
        columns = {
            t: {c[1] for c in db.execute(f"PRAGMA table_info({t})")} for t in ("accounts", "usage", "reservations")
        }
        if columns["reservations"] and "owner" not in columns["reservations"]:
            db.execute("DROP TABLE reservations")  # they name hosts and pids, not leases: none can be vouched for
        for statement in SCHEMA.split(";"):
            db.execute(statement)
        row = db.execute("SELECT value FROM meta WHERE name = 'key_secret'").fetchone()
        if row is None:
            row = (new_secret(),)
            db.execute("INSERT INTO meta VALUES ('key_secret', ?)", row)
        self._secret = bytes.fromhex(row[0])
        self._renew(db)
        now, migrated = str(time.time()), False
        if columns["accounts"] and "hint" not in columns["accounts"]:
            db.execute("ALTER TABLE accounts ADD COLUMN hint TEXT NOT NULL DEFAULT ''")
            db.execute("UPDATE accounts SET hint = key_hint(key), key = key_hash(key)")
            db.execute("UPDATE usage SET key = key_hash(key)")
            db.execute("INSERT INTO meta VALUES ('migrated:hashed_keys', ?)", (now,))
            migrated = True
        if columns["usage"] and "cost" not in columns["usage"]:
            for table in ("accounts", "usage"):
                db.execute(f"ALTER TABLE {table} ADD COLUMN cost TEXT NOT NULL DEFAULT '0'")
                db.execute(f"UPDATE {table} SET cost = price(hit, miss, output)")
            p = self.prices
            prices = f"{p.cache_hit},{p.cache_miss},{p.output} {p.currency} per million tokens"
            db.execute("INSERT INTO meta VALUES ('migrated:costs', ?)", (f"past usage priced at {prices} at {now}",))
            migrated = True
        return migrated

    # --- transactions ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self, begin: str = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute(begin)
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # also a COMMIT that failed: never leave the transaction open
                    self._db.execute("ROLLBACK")
                raise

    @property
    def unavailable(self) -> str | None:
        """Why the ledger takes no writes now (None while it does), in words for clients and /health: no
        path, no SQLite text (the log has those). A removed or replaced file is noticed here, unwritten."""
        self._notice_lost()
        return self._lost or self._failing

    def _failed(self, e: Exception) -> LedgerUnavailable:
        """A write that failed: the details to the log (once, as the ledger starts failing), the reason to
        clients."""
        if self._failing is None:
            log.error(
                "the billing ledger %s cannot be written (%s): billed requests get 503 until it can", self.path, e
            )
        self._failing = CANNOT_WRITE
        return LedgerUnavailable(CANNOT_WRITE)

    def _write(self, fn, *args):
        """Run a write transaction; a database that refuses writes makes the ledger unavailable."""
        with self._lock:
            self._check_file()
            try:
                with self._transaction() as db:
                    result = fn(db, *args)
            except sqlite3.DatabaseError as e:
                raise self._failed(e) from e
            if self._failing is not None:  # a transaction went through: the database takes writes again
                log.warning("the billing ledger %s takes writes again", self.path)
                self._failing = None
            return result

    def _notice_lost(self) -> None:
        """Once the ledger's file is removed or replaced, the ledger is lost for good: this connection would go
        on writing to a file that no one reads. One stat; said in the log once."""
        if self._lost is not None or self.path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if _identity(self.path) == self._file:
                return
        with self._lost_lock:
            if self._lost is None:
                log.error(
                    "the billing ledger %s was removed or replaced while serving (restart the server); usage from "
                    "now on is kept in memory and logged at shutdown",
                    self.path,
                )
                self._lost = LOST

    def _check_file(self) -> None:
        """Raise LedgerUnavailable for good once the ledger's file is removed or replaced."""
        self._notice_lost()
        if self._lost is not None:
            raise LedgerUnavailable(self._lost)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read transaction (one snapshot). A ledger that takes no writes is not read either (its numbers
        would miss the usage it keeps in memory); a read that fails makes LedgerUnavailable, its details
        logged."""
        if (reason := self.unavailable) is not None:
            raise LedgerUnavailable(reason)
        try:
            with self._transaction("BEGIN") as db:
                yield db
        except sqlite3.DatabaseError as e:
            log.error("the billing ledger %s cannot be read (%s)", self.path, e)
            raise LedgerUnavailable(CANNOT_READ) from e

    def _hash(self, key: str) -> str:
        return key_hash(self._secret, key)

    def _account(self, db: sqlite3.Connection, key: str) -> Account:
        """The account of a key's HMAC, with what its requests under a live lease may still spend."""
        row = db.execute(
            "SELECT hint, granted, requests, hit, miss, output, cost FROM accounts WHERE key = ?", (key,)
        ).fetchone()
        account = Account(key)
        if row is not None:
            hint, granted, requests, hit, miss, output, cost = row
            granted = None if granted is None else Decimal(granted)
            account = Account(key, hint, granted, requests, hit, miss, output, Decimal(cost))
        rows = db.execute(LIVE_RESERVATIONS, (key, time.time())).fetchall()
        account.reserved = sum((max(Decimal(a) - Decimal(u), Decimal(0)) for a, u in rows), Decimal(0))
        return account

    def _renew(self, db: sqlite3.Connection) -> None:
        """Extend this process's lease; delete the reservations of every process whose lease lapsed."""
        now = time.time()
        db.execute(RENEW_LEASE, (self.owner, now + LEASE_SECONDS))
        lapsed = db.execute("SELECT owner FROM leases WHERE expires <= ?", (now,)).fetchall()
        db.executemany("DELETE FROM reservations WHERE owner = ?", lapsed)
        db.executemany("DELETE FROM leases WHERE owner = ?", lapsed)

    # --- accounts ----------------------------------------------------------------------------------
    def grant(self, balances: dict[str, Decimal | None]) -> None:
        """Set keys' balances (from the keys file); accounts keep their spending."""
        rows = [(self._hash(k), key_hint(k), None if b is None else str(b)) for k, b in balances.items()]
        self._write(lambda db: db.executemany(GRANT, rows))

    def account(self, key: str, settled: bool = False) -> Account:
        """A key's account; settled=True first waits (up to a second) for the usage still being written."""
        if settled:
            self.flush(timeout=1.0)
        with self._reading() as db:  # one snapshot: the totals and the reservations agree
            return self._account(db, self._hash(key))

    def accounts(self) -> list[Account]:
        with self._reading() as db:
            keys = [k for (k,) in db.execute("SELECT key FROM accounts ORDER BY hint, key")]
            return [self._account(db, k) for k in keys]

    def minimal_cost(self) -> Decimal:
        """The cost of the smallest request: one prompt token, one output token."""
        return self.prices.cost(0, 1, 1)

    def summary(self, key: str) -> dict:
        account = self.account(key, settled=True)
        balance = account.balance()
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
            "cost": float(account.cost),
            "balance": None if balance is None else float(balance),
            "reserved": float(account.reserved),
        }

    # --- requests ----------------------------------------------------------------------------------
    def open(self, key: str, prompt_tokens: int, max_output_tokens: int) -> Meter:
        """Admit a request: reserve its worst case against the key's balance, or raise InsufficientBalance
        (or LedgerUnavailable). Blocking: call it off the event loop."""
        self._check_file()
        self._retry_unwritten()
        worst = self.prices.cost(0, prompt_tokens, max_output_tokens)
        hashed = self._hash(key)

        def reserve(db):
            db.execute(OPEN_ACCOUNT, (hashed, key_hint(key), None))
            self._renew(db)  # and so the reservations of dead processes go
            account = self._account(db, hashed)
            if account.granted is None:
                return None
            if not account.can_afford(worst):
                left = account.balance() - account.reserved
                raise InsufficientBalance(
                    f"this key's balance ({max(left, Decimal(0)):.6f} {self.prices.currency} after open requests) "
                    f"cannot cover this request's worst case ({worst:.6f}: {prompt_tokens} prompt tokens and "
                    f"{max_output_tokens} output tokens): top it up, or lower max_tokens"
                )
            reservation = uuid.uuid4().hex
            db.execute(INSERT_RESERVATION, (reservation, hashed, str(worst), self.owner, time.time()))
            return reservation

        return Meter(self, hashed, self._write(reserve))

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
        if self._lost is None:  # a lost ledger takes nothing more: do not wait for it
            self.flush()
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._writer.join()
        with contextlib.suppress(LedgerUnavailable):  # else the lease lapses by itself
            self._write(self._release)

    def _release(self, db: sqlite3.Connection) -> None:
        """This process's lease, and the reservations of requests it never closed."""
        db.execute("DELETE FROM reservations WHERE owner = ?", (self.owner,))
        db.execute("DELETE FROM leases WHERE owner = ?", (self.owner,))

    def _retry_unwritten(self) -> None:
        """While the ledger is failing, admission waits (up to a second) for the writer's next attempt."""
        if self.unavailable is not None:
            with self._wake:
                self._renew_at = 0.0  # an attempt now, even with no usage to write
                self._wake.notify()
            deadline = time.monotonic() + 1.0
            while self.unavailable is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.unavailable is not None:
                raise LedgerUnavailable(self.unavailable)

    def _write_loop(self) -> None:
        while True:
            with self._wake:  # until a meter changes or the lease is due
                while not self._dirty and not self._stopped and time.monotonic() < self._renew_at:
                    self._wake.wait(self._renew_at - time.monotonic())
                if self._stopped and not self._dirty:
                    return
                meters = list(self._dirty.values())
            snapshot = [(m, m.delivered, m.closed) for m in meters]  # the event loop keeps moving them
            renew = time.monotonic() >= self._renew_at
            try:
                self._write(self._record, snapshot, renew)
            except Exception as e:  # a full or read-only disk, or worse: keep the usage, retry
                if not isinstance(e, LedgerUnavailable):
                    log.exception("the ledger writer failed")
                    self._failing = CANNOT_WRITE
                if self._stopped:  # shutting down: say what could not be written, do not hang
                    log.error("unwritten usage at shutdown: %s", [(m.key, m.delivered) for m in meters])
                    return
                time.sleep(0.5)
                continue
            if renew:
                self._renew_at = time.monotonic() + RENEW_EVERY
            for m, delivered, closed in snapshot:  # only now, with the transaction committed
                m.recorded, m.settled = delivered, closed
            with self._wake:
                for m in meters:
                    if m.recorded == m.delivered and (m.settled or not m.closed):
                        self._dirty.pop(id(m), None)
                self._wake.notify_all()
            time.sleep(WRITE_EVERY)  # changes that arrive meanwhile share the next transaction

    def _record(
        self, db: sqlite3.Connection, snapshot: list[tuple[Meter, tuple[int, int, int], bool]], renew: bool
    ) -> None:
        """One usage row per meter that delivered more, with its cost; the account totals; what each
        reservation has delivered; settled reservations; the lease when due."""
        if renew:
            self._renew(db)
        now = time.time()
        for m, delivered, closed in snapshot:
            hit, miss, out = (a - b for a, b in zip(delivered, m.recorded, strict=True))
            if hit or miss or out:
                cost = str(self.prices.cost(hit, miss, out))
                db.execute(INSERT_USAGE, (m.key, m.request, now, hit, miss, out, cost))
                db.execute(ADD_USAGE, (int(m.recorded == (0, 0, 0)), hit, miss, out, cost, m.key))
                if m.reservation is not None:
                    used = str(self.prices.cost(*delivered))
                    db.execute("UPDATE reservations SET used = ? WHERE id = ?", (used, m.reservation))
            if closed and m.reservation is not None:
                db.execute("DELETE FROM reservations WHERE id = ?", (m.reservation,))

    # --- the old JSON ledger -----------------------------------------------------------------------
    def import_json(self, path: str | Path) -> bool:
        """Take over the accounts of a JSON ledger (nanoseek before SQLite) once, its usage priced at this
        process's prices; the file is renamed."""
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
                hashed, cost = self._hash(key), str(self.prices.cost(hit, miss, out))
                db.execute(OPEN_ACCOUNT, (hashed, key_hint(key), granted))
                db.execute(ADD_USAGE, (requests, hit, miss, out, cost, hashed))
                db.execute(INSERT_USAGE, (hashed, f"imported:{path.name}", time.time(), hit, miss, out, cost))
            db.execute("INSERT INTO meta VALUES (?, ?)", (f"imported:{path.resolve()}", str(time.time())))

        self._write(take)
        path.rename(path.with_name(path.name + ".imported"))
        return True


def unwritable(path: Path | None, reason: str) -> ValueError:
    """The error of a ledger that cannot be opened for writing: the file, why, and what to do."""
    return ValueError(
        f"the ledger {path} cannot be written ({reason}): make it and its folder writable for this user, "
        "or give --ledger a file in a writable folder"
    )


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _private(path: Path) -> None:
    """Create the ledger readable by its owner alone (SQLite gives its -wal and -shm files the database's
    mode), and narrow an older ledger's files."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path.with_name(name), 0o600)


def default_ledger_path(api_keys: str | None) -> Path:
    """Beside the keys file (billing belongs with the keys, never in a disposable cache), else under the
    user's data directory."""
    if api_keys:
        keys = Path(api_keys)
        return keys.with_name(keys.stem + ".ledger.db")
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "nanoseek" / "ledger.db"
