"""`nanoseek serve` attacked as a stranger and used as a careless client would: each test reproduces an
attack that once worked (a poison parameter crashing everyone's requests, a burst overspending a balance,
lost usage on kill -9, huge bodies blocking the loop, lax types). The app runs in this process (tests/
serving.py's InProcess) unless a server must be killed, shared by two, hold a port, or freeze for a client
outside it to notice (real server processes).

Everything runs in float32 (NANOSEEK_AUTO_DTYPE for the processes): these tests compare greedy replies for
equality."""

import asyncio
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import openai
import pytest
import torch
from serving import InProcess, Server, make_model_dir

from nanoseek.serve.config import CACHE_UNIT, EngineConfig, ServeConfig
from nanoseek.serve.engine import Engine
from nanoseek.serve.ledger import Ledger

pytestmark = pytest.mark.anyio

FP32 = {"NANOSEEK_AUTO_DTYPE": "float32"}
ADMIN = "admin-secret"
KEYS = "key-a\nkey-c\nburst 0.02\n"


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return make_model_dir(tmp_path_factory.mktemp("attacked") / "model", tokenizer)


@pytest.fixture(scope="module")
async def server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("attacked-server")
    (root / "keys.txt").write_text(KEYS)
    cfg = ServeConfig(
        model=str(model_dir),
        engine=EngineConfig(enforce_eager=True),
        api_keys=str(root / "keys.txt"),
        admin_key=ADMIN,
        max_pending=16,
    )
    engine = Engine(model_dir, config=cfg.engine, dtype=torch.float32, block_size=CACHE_UNIT)
    async with InProcess(cfg, engine) as s:
        yield s


@pytest.fixture(scope="module")
def process(model_dir, tmp_path_factory):
    """A server process, for the attacks that freeze or hang up on a server: only a client outside its event
    loop can tell a frozen loop, and only a real connection can drop."""
    root = tmp_path_factory.mktemp("attacked-process")
    (root / "keys.txt").write_text(KEYS)
    args = ["--api-keys", str(root / "keys.txt"), "--max-pending", "16"]
    with Server(model_dir, *args, log=root / "server.log", env=FP32) as s:
        yield s


async def stream_text(server: InProcess, key: str, content: str, **options) -> str:
    chunks = await server.openai(key).chat.completions.create(
        model="nanoseek", messages=[{"role": "user", "content": content}], stream=True, **options
    )
    return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])


async def post(server: InProcess, route: str, body: dict | bytes, key: str = "key-a") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with server.client(key) as http:
        return await http.post(route, content=content, headers={"Content-Type": "application/json"}, timeout=120)


def post_to(server: Server, route: str, body: dict | bytes, key: str = "key-a") -> httpx.Response:
    """The same, to a server process."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + route, content=content, headers=headers, timeout=120)


def kill_mid_stream(server: Server, body: dict, key: str | None = None, after: int = 300) -> int:
    """Stream a chat with log-probs until `after` tokens have arrived, then kill -9 the server; returns the
    tokens delivered (one log-prob entry per token)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    delivered = 0
    body = body | {"stream": True, "logprobs": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delivered += len((json.loads(line[6:])["choices"][0].get("logprobs") or {}).get("content") or [])
            if delivered >= after:
                server.kill()
                break
    return delivered


async def test_poison_parameters_from_one_key_change_no_other_keys_tokens(server):
    prompts = [f"stream {i}: tell me about the sea" for i in range(4)]
    greedy = dict(max_tokens=24, temperature=0)
    clean = await asyncio.gather(*(stream_text(server, "key-a", p, **greedy) for p in prompts))
    poison = [
        dict(top_p=1e-300),
        dict(temperature=2, top_p=1e-300, max_tokens=2),
        dict(top_p=1e-45, logprobs=True, top_logprobs=20, frequency_penalty=2, presence_penalty=-2),
        dict(temperature=1e-300, n=3, seed=7),
    ]
    poisoned = [asyncio.create_task(stream_text(server, "key-c", "poison", **({"max_tokens": 4} | p))) for p in poison]
    again = await asyncio.gather(*(stream_text(server, "key-a", p, **greedy) for p in prompts))
    assert all(isinstance(text, str) for text in await asyncio.gather(*poisoned))  # each a 200, not an error
    assert again == clean


async def test_a_concurrent_burst_never_spends_more_than_the_balance(server):
    body = {
        "model": "nanoseek",
        "messages": [{"role": "user", "content": "spend"}],
        "max_tokens": 900,
        "temperature": 0,
    }
    async with server.client("burst") as http:
        before = (await http.get("/v1/billing")).json()
        replies = await asyncio.gather(*(post(server, "/v1/chat/completions", body, "burst") for _ in range(8)))
        statuses = sorted(r.status_code for r in replies)
        assert set(statuses) == {200, 402} and statuses.count(200) <= 2  # 0.02 holds two worst cases of 0.0072+
        after = (await http.get("/v1/billing")).json()
        balance = (await http.get("/user/balance")).json()
    prices = {
        "prompt_cache_hit_tokens": Decimal("0.5"),
        "prompt_cache_miss_tokens": Decimal("2"),
        "completion_tokens": Decimal("8"),
    }
    told = sum(sum(r.json()["usage"][k] * p for k, p in prices.items()) for r in replies if r.status_code == 200)
    assert after["cost"] - before["cost"] == pytest.approx(float(told / 1_000_000), abs=1e-12)
    assert after["cost"] <= 0.02 and after["balance"] >= 0 and after["reserved"] == 0
    assert balance["is_available"] is True  # still covers a minimal request


async def test_lax_types_lone_surrogates_and_impossible_sizes_are_400s(server):
    chat = {"model": "nanoseek", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for field, value in (
        ("max_tokens", "5"),
        ("max_tokens", True),
        ("stream", "yes"),
        ("temperature", "0.5"),
        ("n", 1.5),
    ):
        r = await post(server, "/v1/chat/completions", chat | {field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    raw = b'{"model": "nanoseek", "messages": [{"role": "user", "content": "\\ud800"}]}'
    r = await post(server, "/v1/chat/completions", raw)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    tool = (
        b'{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "description": "\\ud800"}}}'
    )
    raw = b'{"model": "nanoseek", "messages": [{"role": "user", "content": "hi"}], "tools": [' + tool + b"]}"
    r = await post(server, "/v1/chat/completions", raw)  # a 500 once: `parameters` is text too
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
    r = await post(server, "/v1/completions", {"model": "nanoseek", "prompt": ["a", "b"], "n": 9, "max_tokens": 1})
    assert r.status_code == 400 and "--max-pending" in r.json()["error"]["message"]  # 18 > 16: never fits


async def test_completions_take_long_prompts_and_many_from_the_openai_client(server):
    c = server.openai("key-a")
    long = "def fibonacci(n):\n    # return the n-th Fibonacci number, iteratively, in O(n)\n    "
    assert len(long) > 64
    out = await c.completions.create(model="nanoseek", prompt=long, max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    many = await c.completions.create(model="nanoseek", prompt=[f"x = {i}" for i in range(16)], max_tokens=1)
    assert len(many.choices) == 16
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        await c.completions.create(model="nanoseek", prompt=[f"x = {i}" for i in range(65)], max_tokens=1)


async def test_a_huge_body_is_413_unread_and_health_stays_fast_while_big_ones_parse(server):
    huge = b'{"model": "nanoseek", "prompt": "' + b"a" * (10 * 2**20) + b'"}'
    started = time.monotonic()
    r = await post(server, "/v1/completions", huge)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 5
    big = json.dumps({"model": "nanoseek", "messages": [{"role": "user", "content": "word " * 700_000}]}).encode()
    parsing = [asyncio.create_task(post(server, "/v1/chat/completions", big)) for _ in range(3)]
    latencies = []
    async with server.client() as http:
        while not all(p.done() for p in parsing):
            t = time.monotonic()
            await asyncio.sleep(0.005)  # the loop is the others' now: what they do on it, this probe waits out
            assert (await http.get("/health")).status_code == 200
            latencies.append(time.monotonic() - t)
    assert [p.result().status_code for p in parsing] == [400] * 3  # longer than the context
    # FastAPI parses each 3.5 MB body on the event loop (50-100 ms here, under load a little more); what
    # must never block it is tokenising or templating them, which takes seconds: those run off the loop.
    assert latencies and max(latencies) < 0.25, latencies


def test_two_servers_on_one_ledger_record_every_request(model_dir, tmp_path):
    ledger = ["--ledger", str(tmp_path / "ledger.db")]
    with Server(model_dir, *ledger, env=FP32) as one, Server(model_dir, *ledger, env=FP32) as two:
        body = {"model": "nanoseek", "prompt": "count", "max_tokens": 2}
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda s: post_to(s, "/v1/completions", body), [one, two] * 10))
    assert all(r.status_code == 200 for r in replies)
    account = Ledger(tmp_path / "ledger.db").account("anonymous")
    assert account.requests == 20 and account.output == sum(r.json()["usage"]["completion_tokens"] for r in replies)


def test_kill_9_mid_stream_loses_at_most_the_last_moments_of_usage(model_dir, tmp_path):
    ledger = ["--ledger", str(tmp_path / "ledger.db")]
    body = {
        "model": "nanoseek",
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 800,
        "temperature": 0,
    }
    delivered = kill_mid_stream(Server(model_dir, *ledger, env=FP32), body)
    with Server(model_dir, *ledger, env=FP32) as restarted:
        billed = httpx.get(restarted.url + "/v1/billing").json()["usage"]["completion_tokens"]
    assert 0.95 * delivered <= billed <= 800, (delivered, billed)


def test_a_port_in_use_is_a_clear_error_and_nothing_claims_to_serve(model_dir):
    with socket.socket() as taken:  # a listener holds the port (it was a whole server once: it need not be)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(model_dir)]
        second = subprocess.run(
            [*cmd, "--port", str(taken.getsockname()[1])], capture_output=True, text=True, timeout=120
        )
    assert second.returncode != 0 and "pick another --port" in second.stderr
    assert "serving" not in second.stdout


@pytest.mark.parametrize("rounds", [pytest.param(1, id="short"), pytest.param(4, id="long", marks=pytest.mark.slow)])
def test_chaos_mixed_traffic_changes_no_answer_and_the_ledger_matches_the_clients(model_dir, tmp_path, rounds):
    """Plain and streamed requests from several keys, cancelled streams, poison parameters, huge and
    ill-typed bodies, then a kill -9 mid-stream and a restart on the same ledger."""
    (tmp_path / "keys.txt").write_text("a\nb\nc\n")
    args = ["--api-keys", str(tmp_path / "keys.txt"), "--ledger", str(tmp_path / "ledger.db"), "--max-pending", "32"]
    prompts = [f"chaos {i}: the quick brown fox" for i in range(4)]
    chat = {"model": "nanoseek", "max_tokens": 12, "temperature": 0}

    def ask(s: Server, key: str, prompt: str, stream: bool) -> tuple[int, str, dict | None]:
        body = chat | {"messages": [{"role": "user", "content": prompt}]}
        if not stream:
            r = post_to(s, "/v1/chat/completions", body, key)
            ok = r.status_code == 200
            return r.status_code, r.json()["choices"][0]["message"]["content"] if ok else "", r.json().get("usage")
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        text, used = "", None
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    text += "".join(c["delta"].get("content") or "" for c in event["choices"])
                    used = event.get("usage") or used
        return r.status_code, text, used

    def cancel(s: Server) -> int:
        body = chat | {"messages": [{"role": "user", "content": "long"}], "max_tokens": 300, "stream": True}
        with httpx.stream(
            "POST", s.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer c"}, timeout=120
        ) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 6:
                    break
        return r.status_code

    with Server(model_dir, *args, env=FP32) as s:
        clean = {p: ask(s, "c", p, False)[1] for p in prompts}
    poison = chat | {"messages": [{"role": "user", "content": "p"}], "top_p": 1e-300, "temperature": 1.5}
    mischief = [
        lambda s: post_to(s, "/v1/completions", b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}', "c").status_code,
        lambda s: post_to(s, "/v1/chat/completions", chat | {"messages": [], "n": "2"}, "c").status_code,
        lambda s: post_to(s, "/v1/chat/completions", poison, "c").status_code,
        cancel,
    ]
    answers, statuses = [], []
    with Server(model_dir, *args, env=FP32) as s, ThreadPoolExecutor(8) as pool:
        for _ in range(rounds):
            jobs = [pool.submit(ask, s, key, p, key == "b") for p in prompts for key in ("a", "b")]
            jobs += [pool.submit(m, s) for m in mischief]
            for job in jobs:
                result = job.result()
                (answers if isinstance(result, tuple) else statuses).append(result)
    assert {status for status, _, _ in answers} == {200} and set(statuses) <= {200, 400, 413}
    assert {400, 413} <= set(statuses)
    for (_, text, _), (prompt, key) in zip(
        answers, [(p, k) for _ in range(rounds) for p in prompts for k in ("a", "b")], strict=True
    ):
        assert text == clean[prompt], (key, prompt)
    # A kill -9 mid-stream, and a restart on the same ledger.
    body = chat | {"messages": [{"role": "user", "content": "go"}], "max_tokens": 600}
    delivered = kill_mid_stream(Server(model_dir, *args, env=FP32), body, key="b")
    with Server(model_dir, *args, env=FP32) as s:
        billed = {
            key: httpx.get(s.url + "/v1/billing", headers={"Authorization": f"Bearer {key}"}).json()["usage"]
            for key in ("a", "b")
        }
    told = {
        key: [
            u
            for (_, _, u), (_, k) in zip(
                answers, [(p, k) for _ in range(rounds) for p in prompts for k in ("a", "b")], strict=True
            )
            if k == key
        ]
        for key in ("a", "b")
    }
    for name in ("prompt_cache_hit_tokens", "prompt_cache_miss_tokens"):
        assert billed["a"][name] == sum(u[name] for u in told["a"])
    assert billed["a"]["completion_tokens"] == sum(u["completion_tokens"] for u in told["a"])
    streamed = sum(u["completion_tokens"] for u in told["b"])
    assert streamed + 0.95 * delivered <= billed["b"]["completion_tokens"] <= streamed + 600


def chunked(body: dict):
    """A request body sent with Transfer-Encoding: chunked (no Content-Length), in two pieces."""
    data = json.dumps(body).encode()
    yield data[:10]
    yield data[10:]


def test_a_chunked_streamed_request_is_answered_and_the_server_stays_responsive(process):
    """A chunked body once froze the server for good: the body-limit middleware answered every later
    receive() with an empty request, so the stream's disconnect watch spun on the event loop."""
    body = {"model": "nanoseek", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}
    headers = {"Authorization": "Bearer key-a", "Content-Type": "application/json"}
    with httpx.stream(
        "POST", process.url + "/v1/chat/completions", content=chunked(body), headers=headers, timeout=20
    ) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "data: [DONE]" and len(events) > 2
    start = time.monotonic()
    assert httpx.get(process.url + "/health", timeout=5).status_code == 200
    assert time.monotonic() - start < 2


def test_a_chunked_request_whose_client_leaves_stops_and_is_not_billed_in_full(process):
    """A chunked, non-streamed request whose client goes away is cancelled, as a sized one is."""
    body = {
        "model": "nanoseek",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 900,
        "temperature": 0,
    }
    headers = {"Authorization": "Bearer key-a", "Content-Type": "application/json"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(process.url + "/v1/chat/completions", content=chunked(body), headers=headers, timeout=1.5)
    deadline = time.monotonic() + 10
    while process.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.health()["running"] == 0  # cancelled, not run to 900 tokens


async def test_lax_logit_bias_keys_and_malformed_tool_turns_are_400s_naming_the_field(server):
    """int() takes " 5 ", "+5", "٥" and "1_0": token ids are ASCII digits; an out-of-range id is the
    logit_bias field's fault; a tool message needs its tool_call_id and an assistant call before it, and an
    assistant's call arguments are JSON (OpenAI answers each with a 400)."""
    chat = {"model": "nanoseek", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for key in (" 5 ", "+5", "٥", "1_0", "99999999"):
        r = await post(server, "/v1/chat/completions", chat | {"logit_bias": {key: 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", (key, r.text)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    user, answered = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}
    for messages in (
        [user, {"role": "tool", "content": "42", "tool_call_id": "c1"}],  # an orphan result
        [user, answered, {"role": "tool", "content": "42"}],  # no tool_call_id
        [user, answered | {"tool_calls": [call | {"function": {"name": "g", "arguments": "not json"}}]}],
    ):
        r = await post(server, "/v1/chat/completions", chat | {"messages": messages, "tools": tools})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), (messages, r.text)
    ok = await post(
        server,
        "/v1/chat/completions",
        chat | {"messages": [user, answered, {"role": "tool", "content": "4", "tool_call_id": "c1"}]},
    )
    assert ok.status_code == 200, ok.text


async def test_tool_call_arguments_and_tool_descriptions_are_length_checked_before_tokenising(server):
    """Text that holds more tokens than the context is refused unread wherever it sits: an earlier call's
    arguments (1.55M tokens were once tokenised by /tokenize) or a tool's description."""
    big = "x" * 300_000
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"a": big})}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    r = await post(server, "/tokenize", {"model": "nanoseek", "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    tools = [{"type": "function", "function": {"name": "f", "description": big, "parameters": {"type": "object"}}}]
    chat = {"model": "nanoseek", "messages": [{"role": "user", "content": "hi"}], "tools": tools, "max_tokens": 1}
    r = await post(server, "/v1/chat/completions", chat)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


async def test_prompt_log_probs_are_bounded_per_request(server):
    """64 prompts with echo, logprobs 20 and max_tokens 0 once built 36 MB on the event loop: a request
    asks for at most MAX_SCORED_ENTRIES log-probabilities, and the answer is built off the loop."""
    from nanoseek.serve.protocol import MAX_SCORED_ENTRIES

    unit = "def f(x):\n    return x + 1\n"
    per_unit = len((await post(server, "/tokenize", {"model": "nanoseek", "prompt": unit})).json()["tokens"])
    prompt = unit * (900 // per_unit)  # about 900 tokens, within the tiny model's 1024 positions
    tokens = len((await post(server, "/tokenize", {"model": "nanoseek", "prompt": prompt})).json()["tokens"])
    body = {"model": "nanoseek", "prompt": [prompt] * 16, "echo": True, "logprobs": 20, "max_tokens": 0}
    assert 16 * tokens * 21 > MAX_SCORED_ENTRIES  # (16: this server's --max-pending)
    r = await post(server, "/v1/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
    few = await post(server, "/v1/completions", body | {"prompt": [prompt] * 2, "logprobs": 1})
    assert few.status_code == 200 and len(few.json()["choices"][0]["logprobs"]["tokens"]) >= tokens - 1  # no BOS
