"""The ledger: SQLite shared by processes, reservations that no burst can overspend, usage written as it is
delivered, a database that refuses writes turns requests away and loses nothing, and the keys file."""

import json
import sqlite3
import subprocess
import sys
from decimal import Decimal

import pytest

from nanoseek.serve.billing import InsufficientBalance, Ledger, LedgerUnavailable, PriceTable, read_api_keys

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
        "import sys; from nanoseek.serve.billing import Ledger\n"
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


def test_a_killed_processes_reservations_are_dropped(tmp_path):
    ledger = Ledger(tmp_path / "l.db", PRICES)
    ledger.grant({"k": Decimal("0.01")})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ledger._db.execute("INSERT INTO reservations VALUES ('x', 'k', '0.01', ?, ?, 0)", (ledger.host, int(dead.stdout)))
    assert ledger.account("k").reserved == Decimal("0.01")
    assert Ledger(tmp_path / "l.db", PRICES).account("k").reserved == 0  # a restart drops it


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
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("key,requests") and rows[1] == "alice,1,64,36,20,0.000264,0.999736,0.000000"
    assert rows[2].startswith("bob,0,") and "unlimited" in rows[2]
    assert main(["ledger", "--ledger", str(tmp_path / "l.db")]) == 0
    assert "alice" in capsys.readouterr().out
