"""The ledger: SQLite shared by processes, reservations that no burst can overspend, usage written as it is
delivered, a database that refuses writes turns requests away and loses nothing, and the keys file."""

import json
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal

import pytest

from nanoseek.serve import ledger as ledger_module
from nanoseek.serve.keys import read_api_keys
from nanoseek.serve.ledger import InsufficientBalance, Ledger, LedgerUnavailable
from nanoseek.serve.ledger_report import usage_report
from nanoseek.serve.prices import PriceTable

PRICES = PriceTable.parse("0.5, 2, 8", "CNY")


def test_prices_are_exact_decimals_and_bad_tables_are_refused():
    assert PRICES.cost(1_000_000, 1_000_000, 1_000_000) == Decimal("10.5")
    for bad in ("1,2", "1,nan,2", "1,-2,3", "a,b,c"):
        with pytest.raises(ValueError):
            PriceTable.parse(bad)


def test_reservations_keep_a_burst_within_the_balance(tmp_path):
    ledger = Ledger(tmp_path / "ledger.db", PRICES)
    ledger.grant({"poor": Decimal("0.02"), "rich": None})
    # Each request reserves 100 prompt tokens at 2 + 900 output tokens at 8 per million: 0.0074.
    meters = []
    with pytest.raises(InsufficientBalance, match="worst case"):
        for _ in range(8):
            meters.append(ledger.open("poor", 100, 900))
    assert len(meters) == 2 and ledger.account("poor").reserved == Decimal("0.0148")
    meters[0].deliver(0, 100, 500)
    meters[0].close()
    assert ledger.flush()
    account = ledger.account("poor")
    assert account.reserved == Decimal("0.0074") and account.output == 500 and account.requests == 1
    assert ledger.open("rich", 10**6, 10**6).reservation is None  # no balance: nothing to reserve


def test_two_processes_share_one_ledger_and_every_request_is_recorded(tmp_path):
    script = (
        "import sys; from nanoseek.serve.ledger import Ledger\n"
        "ledger = Ledger(sys.argv[1])\n"
        "for _ in range(10):\n"
        "    m = ledger.open('k', 3, 5); m.deliver(1, 2, 5); m.close()\n"
        "ledger.close()\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "l.db")]) for _ in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    account = Ledger(tmp_path / "l.db").account("k")
    assert (account.requests, account.hit, account.miss, account.output) == (20, 20, 40, 100)


def test_usage_is_written_as_it_is_delivered(tmp_path):
    ledger = Ledger(tmp_path / "l.db", PRICES)
    meter = ledger.open("k", 10, 100)
    for delivered in (1, 7, 30):
        meter.deliver(0, 10, delivered)
        assert ledger.flush()
        assert Ledger(tmp_path / "l.db").account("k").output == delivered  # what another process sees
    rows = sqlite3.connect(tmp_path / "l.db").execute("SELECT output FROM usage").fetchall()
    assert [r for (r,) in rows] == [1, 6, 23]  # one usage row per change


def test_a_read_only_ledger_refuses_requests_keeps_the_usage_and_recovers(tmp_path):
    ledger = Ledger(tmp_path / "l.db", PRICES)
    running = ledger.open("k", 10, 100)
    ledger._db.execute("PRAGMA query_only = 1")  # SQLite refuses every write, as on a read-only disk
    running.deliver(0, 10, 50_000)
    assert not ledger.flush(timeout=1.0)
    assert "cannot be written" in ledger.unavailable
    with pytest.raises(LedgerUnavailable):
        ledger.open("k", 10, 100)
    ledger._db.execute("PRAGMA query_only = 0")  # writable again
    running.close()
    assert ledger.flush()
    assert ledger.unavailable is None and ledger.account("k").output == 50_000
    ledger.open("k", 10, 100)  # admitted again


def test_a_running_request_holds_back_only_what_it_has_not_delivered(tmp_path):
    """A stream's delivered tokens are in the account's cost: its reservation must not count them again."""
    ledger = Ledger(tmp_path / "l.db", PRICES)
    ledger.grant({"k": Decimal("0.02")})
    running = ledger.open("k", 10, 1000)  # worst case 0.00802
    running.deliver(0, 10, 650)  # 0.00522 delivered, 0.0028 still held back
    assert ledger.flush()
    account = ledger.account("k")
    assert account.reserved == Decimal("0.0028") and account.balance() == Decimal("0.01478")
    assert account.can_afford(Decimal("0.00802"))  # /user/balance's is_available agrees with admission
    ledger.open("k", 10, 1000)  # 0.01198 is left after open requests: admitted
    running.deliver(0, 10, 1000)
    running.close()
    assert ledger.flush() and ledger.account("k").reserved == Decimal("0.00802")


def test_a_dead_servers_reservations_lapse_with_its_lease_without_a_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "LEASE_SECONDS", 1.0)
    monkeypatch.setattr(ledger_module, "RENEW_EVERY", 0.2)
    ledger = Ledger(tmp_path / "l.db", PRICES)
    ledger.grant({"k": Decimal("0.01")})
    script = (
        "import sys, time; from nanoseek.serve import ledger\n"
        "ledger.LEASE_SECONDS, ledger.RENEW_EVERY = 1.0, 0.2\n"
        "ledger.Ledger(sys.argv[1]).open('k', 0, 1250)\n"  # the whole balance: 1250 output tokens at 8
        "print('reserved', flush=True)\n"
        "time.sleep(120)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "l.db")], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "reserved\n"
        time.sleep(1.5)  # longer than a lease: a live server renews it
        with pytest.raises(InsufficientBalance):
            ledger.open("k", 0, 1)
    finally:
        server.kill()  # SIGKILL: nothing of it runs again
        server.wait()
    deadline = time.monotonic() + 5
    while ledger.account("k").reserved and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ledger.account("k").reserved == 0
    ledger.open("k", 0, 1250)  # the whole balance again, and no server restarted
    assert len(sqlite3.connect(tmp_path / "l.db").execute("SELECT * FROM reservations").fetchall()) == 1


def test_costs_are_recorded_at_the_prices_in_force_when_the_request_ran(tmp_path, capsys):
    from nanoseek.cli import main

    ledger = Ledger(tmp_path / "l.db", PRICES)
    ledger.grant({"alice": Decimal("1")})
    meter = ledger.open("alice", 100, 50)
    meter.deliver(64, 36, 20)  # 0.000264 at 0.5, 2, 8
    meter.close()
    ledger.close()
    dearer = Ledger(tmp_path / "l.db", PriceTable.parse("5,20,80"))  # a restart with other --prices
    account = dearer.account("alice")
    assert account.cost == Decimal("0.000264") and account.balance() == Decimal("0.999736")
    meter = dearer.open("alice", 1, 1)
    meter.deliver(0, 1, 1)  # 0.0001 at the new prices
    meter.close()
    dearer.close()
    assert dearer.account("alice").balance() == Decimal("0.999636")
    assert main(["ledger", "--ledger", str(tmp_path / "l.db"), "--prices", "1,1,1", "--csv"]) == 0
    assert ",0.000364,0.999636," in capsys.readouterr().out


OLD_SCHEMA = """
CREATE TABLE accounts (
    key TEXT PRIMARY KEY, granted TEXT, requests INTEGER NOT NULL DEFAULT 0,
    hit INTEGER NOT NULL DEFAULT 0, miss INTEGER NOT NULL DEFAULT 0, output INTEGER NOT NULL DEFAULT 0);
CREATE TABLE usage (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL, request TEXT NOT NULL, time REAL NOT NULL,
    hit INTEGER NOT NULL, miss INTEGER NOT NULL, output INTEGER NOT NULL);
CREATE TABLE reservations (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, amount TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    time REAL NOT NULL);
CREATE INDEX reservations_by_key ON reservations (key);
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO accounts VALUES ('sk-alice-secret-0001', '1', 1, 64, 36, 20);
INSERT INTO usage VALUES (1, 'sk-alice-secret-0001', 'r1', 0, 64, 36, 20);
INSERT INTO reservations VALUES ('x', 'sk-alice-secret-0001', '0.5', 'elsewhere', 1, 0);
"""


def test_an_old_ledger_is_priced_once_and_its_keys_hashed(tmp_path):
    old = sqlite3.connect(tmp_path / "l.db")
    old.executescript(OLD_SCHEMA)
    old.close()
    ledger = Ledger(tmp_path / "l.db", PRICES)  # the prices of the process that migrates
    account = ledger.account("sk-alice-secret-0001")
    assert (account.requests, account.output, account.cost, account.reserved) == (1, 20, Decimal("0.000264"), 0)
    ledger.close()
    assert b"sk-alice-secret" not in b"".join(f.read_bytes() for f in tmp_path.iterdir())
    db = sqlite3.connect(tmp_path / "l.db")
    assert [Decimal(c) for (c,) in db.execute("SELECT cost FROM usage")] == [Decimal("0.000264")]
    assert "0.5,2,8" in db.execute("SELECT value FROM meta WHERE name = 'migrated:costs'").fetchone()[0]
    again = Ledger(tmp_path / "l.db", PriceTable.parse("5,20,80"))
    assert again.account("sk-alice-secret-0001").cost == Decimal("0.000264")  # priced once


def test_the_ledger_keeps_no_api_key_and_only_its_owner_reads_it(tmp_path):
    keys = {"sk-alpha-0123456789abcdef": Decimal("1"), "sk-beta-fedcba9876543210": None}
    ledger = Ledger(tmp_path / "l.db", PRICES)
    ledger.grant(keys)
    for key in keys:
        meter = ledger.open(key, 10, 10)
        meter.deliver(0, 10, 5)
        meter.close()
    assert ledger.flush()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["l.db", "l.db-shm", "l.db-wal"]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o600)}
    data = b"".join(f.read_bytes() for f in files)
    assert not [key for key in keys if key.encode() in data or key[:-4].encode() in data]
    assert ledger.account("sk-alpha-0123456789abcdef").requests == 1  # looked up by the key itself
    report = usage_report(ledger)
    assert "...cdef" in report and "...3210" in report


def test_a_ledger_deleted_while_serving_turns_requests_away_and_says_so(tmp_path, caplog):
    ledger = Ledger(tmp_path / "l.db", PRICES)
    running = ledger.open("k", 10, 100)
    for f in tmp_path.iterdir():
        f.unlink()
    with pytest.raises(LedgerUnavailable, match="removed"):
        ledger.open("k", 10, 100)
    assert "removed" in ledger.unavailable
    running.deliver(0, 10, 5)
    assert not ledger.flush(timeout=1.0)  # kept in memory, not written to a file nobody will read
    with pytest.raises(LedgerUnavailable):
        ledger.open("k", 10, 100)
    assert len([r for r in caplog.records if "removed" in r.getMessage()]) == 1  # logged once


def test_a_json_ledger_is_imported_once(tmp_path):
    totals = {"requests": 2, "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 10, "completion_tokens": 7}
    old = {"accounts": {"a": {**totals, "granted": "1.5"}}}
    (tmp_path / "ledger.json").write_text(json.dumps(old))
    ledger = Ledger(tmp_path / "l.db", PRICES)
    assert ledger.import_json(tmp_path / "ledger.json") and not ledger.import_json(tmp_path / "ledger.json")
    account = ledger.account("a")
    assert (account.requests, account.hit, account.miss, account.output, account.granted) == (2, 64, 10, 7, 1.5)
    assert (tmp_path / "ledger.json.imported").is_file()


def test_not_a_ledger_is_a_clear_error(tmp_path):
    (tmp_path / "l.db").write_text("hello, I am not SQLite" * 100)
    with pytest.raises(ValueError, match="not a nanoseek ledger"):
        Ledger(tmp_path / "l.db")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("alpha nan\n", "finite"),
        ("alpha sNaN\n", "finite"),
        ("alpha -1\n", "finite"),
        ("alpha lots\n", "number"),
        ("alpha\n\n# c\nalpha 2\n", "line 1 appears again"),
        ("a b c\n", "KEY"),
        ("# nothing\n", "no API keys"),
        ("caf\u00e9\n", "printable ASCII"),
    ],
)
def test_a_bad_keys_file_is_refused_at_startup_naming_the_line(tmp_path, text, error):
    (tmp_path / "keys").write_text(text)
    with pytest.raises(ValueError, match=error) as e:
        read_api_keys(tmp_path / "keys")
    assert "keys" in str(e.value)


def test_keys_files_allow_comments_blank_lines_and_a_byte_order_mark(tmp_path):
    (tmp_path / "keys").write_bytes("\ufeff# keys\n\nalpha 1.5\nbeta  # unlimited\n".encode())
    assert read_api_keys(tmp_path / "keys") == {"alpha": Decimal("1.5"), "beta": None}


def test_the_ledger_command_prints_and_exports_usage(tmp_path, capsys):
    from nanoseek.cli import main

    ledger = Ledger(tmp_path / "l.db", PRICES)
    ledger.grant({"alice": Decimal("1"), "bob": None})
    meter = ledger.open("alice", 100, 50)
    meter.deliver(64, 36, 20)
    meter.close()
    ledger.close()
    assert main(["ledger", "--ledger", str(tmp_path / "l.db"), "--csv"]) == 0
    rows = [row.split(",") for row in capsys.readouterr().out.splitlines()]
    assert rows[0][:3] == ["account", "key", "requests"]  # an account is its key's HMAC and last characters
    alice, bob = (next(row for row in rows if row[1] == hint) for hint in ("...e", "..."))  # bob: too short to show
    assert alice[2:] == ["1", "64", "36", "20", "0.000264", "0.999736", "0.000000"]
    assert bob[2] == "0" and bob[7] == "unlimited" and len(rows) == 3
    assert main(["ledger", "--ledger", str(tmp_path / "l.db")]) == 0
    assert "...e " in capsys.readouterr().out
