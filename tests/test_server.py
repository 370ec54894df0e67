"""The API server called with the real `openai` client: chat and completions, streaming, context caching in
memory and on disk, per-key isolation, billing, auth and the error envelope, cancellation on disconnect,
metrics. The app runs in this process (tests/serving.py's InProcess: a real engine behind httpx's ASGI
transport); `nanoseek serve` runs as a process only where its own console is what is tested."""

import asyncio
import logging
import sqlite3
import time
from decimal import Decimal

import openai
import pytest
from serving import InProcess, Server, make_model_dir

from nanoseek.serve.config import EngineConfig, ServeConfig
from nanoseek.serve.ledger import Ledger

pytestmark = [pytest.mark.auto_dtype, pytest.mark.anyio]  # CI runs this module again with the other auto dtype

LONG = (
    "Summarise this function for me, please: def fibonacci(n):\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n# and explain why its running time grows exponentially "
    "with n, and how memoisation with functools.lru_cache fixes that, in two sentences."
)
GREEDY = dict(max_tokens=8, temperature=0)
ADMIN_KEY = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return make_model_dir(tmp_path_factory.mktemp("served") / "model", tokenizer)


def settings(model_dir, **changes) -> ServeConfig:
    """`nanoseek serve --model DIR --enforce-eager` and `changes`, the engine's (cache_dir) among them."""
    engine = EngineConfig(enforce_eager=True, cache_dir=changes.pop("cache_dir", None))
    return ServeConfig(model=str(model_dir), engine=engine, **changes)


@pytest.fixture(scope="module")
async def server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    (root / "keys.txt").write_text("key-a\nkey-b  # no balance: unlimited\nkey-poor 0.0000001\n")
    cfg = settings(
        model_dir, api_keys=str(root / "keys.txt"), cache_dir=str(root / "kv"), max_pending=8, admin_key=ADMIN_KEY
    )
    async with InProcess(cfg) as s:  # the engine as `nanoseek serve` builds it: the hardware's auto dtype
        yield s


def client(server: InProcess, key: str = "key-a") -> openai.AsyncOpenAI:
    return server.openai(key)


async def chat(c: openai.AsyncOpenAI, content: str = LONG, **kwargs):
    return await c.chat.completions.create(
        model="nanoseek", messages=[{"role": "user", "content": content}], **(GREEDY | kwargs)
    )


async def streamed(response) -> list:
    return [chunk async for chunk in await response]


async def test_chat_streamed_and_not_give_the_same_greedy_reply_and_usage(server):
    c = client(server)
    whole = await chat(c, "Hello there")
    chunks = await streamed(chat(c, "Hello there", stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert whole.choices[0].message.content == text and text
    assert whole.choices[0].finish_reason == "length" and chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 8 == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.prompt_cache_hit_tokens + usage.prompt_cache_miss_tokens == usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_cache_hit_tokens
    assert usage.completion_tokens_details.reasoning_tokens == 0


async def test_completions_streamed_and_not_and_fill_in_the_middle(server):
    c = client(server)
    whole = await c.completions.create(model="nanoseek", prompt="def add(a, b):", **GREEDY)
    pieces = await streamed(c.completions.create(model="nanoseek", prompt="def add(a, b):", stream=True, **GREEDY))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert whole.usage.completion_tokens == 8 and whole.object == "text_completion"
    echoed = await c.completions.create(model="nanoseek", prompt="def add(a, b):", echo=True, **GREEDY)
    assert echoed.choices[0].text == "def add(a, b):" + whole.choices[0].text
    fim = await c.completions.create(model="nanoseek", prompt="def add(a, b):\n", suffix="\n    return c\n", **GREEDY)
    assert fim.usage.completion_tokens == 8
    batch = await c.completions.create(model="nanoseek", prompt=["x = 1", "y = 2"], n=2, **GREEDY)
    assert [ch.index for ch in batch.choices] == [0, 1, 2, 3] and batch.usage.completion_tokens == 32


async def test_a_repeated_long_prompt_hits_the_cache_in_64_token_units_with_the_same_reply(server):
    c = client(server, "key-a")
    first, second = await chat(c, LONG + " (repeat)"), await chat(c, LONG + " (repeat)")
    assert first.usage.prompt_tokens > 128
    assert first.usage.prompt_cache_hit_tokens == 0
    hit = second.usage.prompt_cache_hit_tokens
    assert hit > 0 and hit % 64 == 0 and hit == 64 * (second.usage.prompt_tokens // 64)
    assert second.choices[0].message.content == first.choices[0].message.content


async def test_one_keys_prefix_never_hits_for_another_key(server):
    text = LONG + " (isolation)"
    await chat(client(server, "key-a"), text)
    assert (await chat(client(server, "key-a"), text)).usage.prompt_cache_hit_tokens > 0
    assert (await chat(client(server, "key-b"), text)).usage.prompt_cache_hit_tokens == 0


async def test_n_choices_logprobs_and_seeds(server):
    c = client(server)
    options = dict(n=2, temperature=1.0, seed=7, logprobs=True, top_logprobs=3, max_tokens=5)
    out = await chat(c, "Pick a number", **options)
    assert [ch.index for ch in out.choices] == [0, 1] and out.usage.completion_tokens == 10
    for choice in out.choices:
        assert len(choice.logprobs.content) == 5
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in choice.logprobs.content)
    again = await chat(c, "Pick a number", **options)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in out.choices]


async def test_streamed_logprobs_cover_every_token_even_when_text_is_held_back(server):
    chunks = await streamed(chat(client(server), "Hello", stream=True, logprobs=True, top_logprobs=2, stop=["\n\n"]))
    entries = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert len(entries) == 8 and all(len(e.top_logprobs) == 2 for e in entries)


async def test_billing_sums_the_requests_usage_at_the_price_table(server):
    c = client(server, "key-b")
    async with server.client("key-b") as http:
        before = (await http.get("/v1/billing")).json()
        usages = [(await chat(c, LONG + f" (bill {i})")).usage for i in range(2)]
        usages.append((await chat(c, LONG + " (bill 0)")).usage)
        after = (await http.get("/v1/billing")).json()
    delta = {k: after["usage"][k] - before["usage"][k] for k in after["usage"]}
    assert delta == {
        "requests": 3,
        "prompt_cache_hit_tokens": sum(u.prompt_cache_hit_tokens for u in usages),
        "prompt_cache_miss_tokens": sum(u.prompt_cache_miss_tokens for u in usages),
        "completion_tokens": sum(u.completion_tokens for u in usages),
    }
    assert usages[2].prompt_cache_hit_tokens > 0  # the third request was billed at the cache-hit price
    price = {"hit": Decimal("0.5"), "miss": Decimal("2"), "out": Decimal("8")}  # yuan per million tokens
    expected = sum(
        (
            u.prompt_cache_hit_tokens * price["hit"]
            + u.prompt_cache_miss_tokens * price["miss"]
            + u.completion_tokens * price["out"]
        )
        / 1_000_000
        for u in usages
    )
    assert after["cost"] - before["cost"] == pytest.approx(float(expected), rel=1e-9)
    assert after["currency"] == "CNY" and after["balance"] is None


async def test_auth_errors_are_401_and_a_spent_balance_is_402(server):
    async with server.client() as http:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-a"}):
            r = await http.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            await chat(client(server, "wrong"))
        with pytest.raises(openai.APIStatusError) as e:  # 0.0000001 yuan cannot cover one token's reservation
            await chat(client(server, "key-poor"), "hi", max_tokens=1)
        assert e.value.status_code == 402 and e.value.body["type"] == "insufficient_balance"
        balance = (await http.get("/user/balance", headers={"Authorization": "Bearer key-poor"})).json()
        assert balance["is_available"] is False


async def test_bad_requests_are_400_in_the_openai_envelope_and_unknown_models_404(server):
    c = client(server)
    async with server.client("key-a") as http:
        r = await http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = await http.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.BadRequestError) as e:
        await chat(c, temperature=3.5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        await chat(c, "word " * 1200)
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        await c.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"


async def test_a_client_that_disconnects_mid_stream_cancels_its_generation(server):
    body = {
        "model": "nanoseek",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
    }
    async with server.client("key-a") as http, server.client() as probe:
        stream = asyncio.create_task(http.post("/v1/chat/completions", json=body))
        while (await probe.get("/health")).json()["running"] < 1:
            assert not stream.done(), "the stream ended before it was seen running"
            await asyncio.sleep(0.01)
        stream.cancel()  # the client leaves (as a dropped connection cancels the app)
        await asyncio.gather(stream, return_exceptions=True)
        deadline = time.monotonic() + 10
        while (await probe.get("/health")).json()["running"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        health = (await probe.get("/health")).json()
        assert health | {"status": "ok"} == {"status": "ok", "running": 0, "waiting": 0, "pending": 0}
        metrics = (await probe.get("/metrics", headers=ADMIN)).text
    generated = next(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("nanoseek_generation_tokens_total")
    )
    assert generated < 900  # far fewer than the request asked for: it was stopped


async def test_a_server_captures_its_decode_buckets_before_it_serves_and_replies_as_eager(model_dir, server, tmp_path):
    """A process: what `nanoseek serve` prints as it starts is the test."""
    with Server(model_dir, "--max-seqs", "2", log=tmp_path / "log", eager=False) as s:
        log = (tmp_path / "log").read_text()
        assert log.count("captured") == 1 and "decode steps for batches 1-2 captured in" in log, log  # said once
        assert log.index("batches 1-2 captured") < log.index("nanoseek serving")
        process = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        captured = [
            process.chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": t}], **GREEDY)
            for t in "ab"
        ]
    eager = [await chat(client(server), text) for text in "ab"]
    assert [r.choices[0].message.content for r in captured] == [r.choices[0].message.content for r in eager]


async def test_a_full_server_answers_429_with_retry_after(model_dir, tmp_path):
    body = {
        "model": "nanoseek",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 600,
        "temperature": 0,
        "stream": True,
    }
    cfg = settings(model_dir, max_pending=1, ledger=str(tmp_path / "ledger.db"))
    async with InProcess(cfg) as s, s.client() as http:
        stream = asyncio.create_task(http.post("/v1/chat/completions", json=body))
        while (await http.get("/health")).json()["pending"] < 1:
            assert not stream.done(), "the stream ended before it was seen pending"
            await asyncio.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            await s.openai("x").chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": "hi"}])
        assert e.value.response.headers["retry-after"] == "1"
        stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)


async def test_the_disk_cache_survives_a_restart_and_a_corrupt_file_is_a_correct_miss(model_dir, tmp_path):
    """Three servers, one after the other, on one cache folder and one ledger: each a new engine that reads
    the disk cache the one before wrote (its shutdown finished the writes)."""
    cache = tmp_path / "kv"
    cfg = settings(model_dir, cache_dir=str(cache), ledger=str(tmp_path / "ledger.db"))

    async def serve_once() -> tuple:
        async with InProcess(cfg) as s, s.client() as http:
            reply = await chat(s.openai("x"))
            return reply, (await http.get("/metrics")).text

    first, _ = await serve_once()
    files = sorted(cache.glob("*/*.kv"))
    assert first.usage.prompt_cache_hit_tokens == 0 and len(files) == first.usage.prompt_tokens // 64
    restarted, metrics = await serve_once()
    assert restarted.usage.prompt_cache_hit_tokens == 64 * (first.usage.prompt_tokens // 64)
    assert restarted.choices[0].message.content == first.choices[0].message.content
    assert (
        'nanoseek_prefix_cache_hit_tokens_total{tier="disk"} ' + f"{restarted.usage.prompt_cache_hit_tokens}.0"
        in metrics
    )
    for f in sorted(cache.glob("*/*.kv")):  # flip one byte in the middle of every file
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    corrupt, metrics = await serve_once()
    assert corrupt.usage.prompt_cache_hit_tokens == 0
    assert "nanoseek_disk_cache_corrupt_files_total 1.0" in metrics  # the chain stops at the first bad block
    assert corrupt.choices[0].message.content == first.choices[0].message.content
    assert Ledger(tmp_path / "ledger.db").account("anonymous").requests == 3  # the ledger survived the restarts


async def test_metrics_expose_latencies_tokens_cache_hits_and_load(server):
    await chat(client(server), "metrics please")
    async with server.client() as http:
        for headers in ({}, {"Authorization": "Bearer key-a"}):  # every tenant's traffic: the admin's alone
            assert (await http.get("/metrics", headers=headers)).status_code == 401
        text = (await http.get("/metrics", headers=ADMIN)).text
    for name in (
        "nanoseek_time_to_first_token_seconds_bucket",
        "nanoseek_inter_token_latency_seconds_count",
        "nanoseek_e2e_request_latency_seconds_sum",
        "nanoseek_prompt_tokens_total",
        "nanoseek_generation_tokens_total",
        'nanoseek_prefix_cache_hit_tokens_total{tier="memory"}',
        "nanoseek_requests_running",
        "nanoseek_requests_waiting",
        "nanoseek_spec_decode_acceptance_rate",
    ):
        assert name in text, name


async def test_streamed_completion_text_offsets_run_on_across_chunks_as_the_whole_replys(server):
    """text_offset is each token's place in the whole text (the echoed prompt included), not in its chunk:
    the streamed offsets equal the non-streamed ones (they once restarted at 0 in every chunk)."""
    c = client(server)
    options = dict(model="nanoseek", prompt="def add(a, b):", max_tokens=12, temperature=0, logprobs=1)
    whole = (await c.completions.create(**options)).choices[0].logprobs.text_offset
    chunks = await streamed(c.completions.create(stream=True, **options))
    offsets = [o for ch in chunks if ch.choices[0].logprobs for o in ch.choices[0].logprobs.text_offset]
    assert offsets == whole and whole == sorted(whole) and len(set(whole)) > 1
    echoed = await c.completions.create(echo=True, **options | {"logprobs": None, "max_tokens": 1})
    assert echoed.choices[0].text.startswith("def add(a, b):")


async def test_tokenize_adds_bos_as_vllms_does_and_text_completions_do_not(server):
    """Settled: /tokenize follows vLLM (add_special_tokens, default true, puts BOS first); a text completion's
    prompt has no BOS, as nanoseek's pretraining windows never had one (documents end in EOS instead)."""
    text = "def add(a, b):"
    async with server.client("key-a") as http:
        counted = (await http.post("/tokenize", json={"model": "nanoseek", "prompt": text})).json()
        body = {"model": "nanoseek", "prompt": text, "add_special_tokens": False}
        plain = (await http.post("/tokenize", json=body)).json()
    assert counted["tokens"][1:] == plain["tokens"] and counted["count"] == plain["count"] + 1
    out = await client(server).completions.create(model="nanoseek", prompt=text, max_tokens=1, temperature=0)
    assert out.usage.prompt_tokens == plain["count"]


# --- what a failure tells a client: a reason, or an error id; never a path, a port or SQLite's words ------------
async def test_an_unexpected_error_is_a_500_with_an_error_id_never_the_exceptions_text(server, monkeypatch, caplog):
    """A gloo error text, with its source path and ports, once reached a 500 body: the client gets an id, the
    server's log has the details under it (as an engine failure's do)."""

    def fail():
        raise RuntimeError("[/__w/pytorch/third_party/gloo/transport/tcp/pair.cc:553] peer 127.0.0.1:29511 gone")

    monkeypatch.setattr(server.app.state.service.engine, "stats", fail)
    with caplog.at_level(logging.ERROR, logger="nanoseek.serve"):
        async with server.client(raise_app_exceptions=False) as http:
            r = await http.get("/health")
    error = r.json()["error"]
    assert r.status_code == 500 and error["type"] == "server_error" and "error id" in error["message"], r.text
    assert "pair.cc" not in r.text and "29511" not in r.text
    error_id = error["message"].rsplit("error id ", 1)[1].strip(")")
    assert any(error_id in rec.getMessage() and "pair.cc" in (rec.exc_text or "") for rec in caplog.records)


async def test_a_ledger_that_cannot_be_read_is_the_same_503_as_other_ledger_failures(server, monkeypatch, caplog):
    """/v1/billing and /user/balance read the ledger: SQLite's error there was a 500 that quoted it."""
    ledger = server.app.state.service.admission.ledger

    def malformed(*args):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(ledger, "_account", malformed)
    with caplog.at_level(logging.ERROR, logger="nanoseek.serve"):
        async with server.client("key-a", raise_app_exceptions=False) as http:
            for route in ("/v1/billing", "/user/balance"):
                r = await http.get(route)
                assert r.status_code == 503 and r.headers["retry-after"] == "5", (route, r.text)
                assert r.json()["error"]["code"] == "ledger_unavailable" and "malformed" not in r.text, r.text
    assert any("malformed" in rec.getMessage() and str(ledger.path) in rec.getMessage() for rec in caplog.records)


class FullDisk:
    """A ledger connection on a full disk: every write fails as SQLite's do there (SQLITE_FULL)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __getattr__(self, name):
        return getattr(self.db, name)

    def execute(self, sql: str, *args):
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def executemany(self, sql: str, *args):
        raise sqlite3.OperationalError("database or disk is full")


@pytest.mark.parametrize("fault", ["deleted", "disk full"])
async def test_health_and_billed_requests_are_503s_while_the_ledger_takes_no_writes(
    model_dir, tmp_path, monkeypatch, caplog, fault
):
    """/health said ok while the ledger's disk was full and every billed request got a 503: it says why now
    (in plain words: no path, no SQLite text, which go to the log), and a billed request gets the 503 in
    OpenAI's envelope."""
    from nanoseek.serve import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "RENEW_EVERY", 0.2)  # the lease renewal that finds a full disk, soon
    path = tmp_path / "billing" / "ledger.db"
    body = {"model": "nanoseek", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with caplog.at_level(logging.WARNING, logger="nanoseek.serve"):
        async with InProcess(settings(model_dir, ledger=str(path))) as s, s.client() as http:
            assert (await http.get("/health")).status_code == 200
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
            ledger = s.app.state.service.admission.ledger
            if fault == "deleted":
                for f in path.parent.iterdir():
                    f.unlink()
            else:
                ledger._db = FullDisk(ledger._db)
            deadline = time.monotonic() + 10
            while (health := await http.get("/health")).status_code == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert health.status_code == 503 and health.json()["status"] == "unavailable", health.text
            reason = health.json()["reason"]
            assert "billing ledger" in reason, reason
            refused = await http.post("/v1/chat/completions", json=body)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
            error = refused.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "ledger_unavailable"
            assert (await http.get("/v1/billing")).status_code == 503  # its numbers would miss the unwritten usage
            for text in (reason, error["message"]):
                assert str(tmp_path) not in text and "disk is full" not in text, text
            if fault == "disk full":  # room again: the ledger writes what it kept and takes requests again
                ledger._db = ledger._db.db
                while (await http.get("/health")).status_code == 503 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert str(path) in logged and ("disk is full" in logged or fault == "deleted"), logged
