"""Serving on a torchrun launch (nanoseek.serve.parallel), for real: `torchrun` processes on gloo, each rank
with its own engine and a share of the routed experts, exchanging tokens by all-to-all, against one process on
the same checkpoint: greedy tokens identical, log-probabilities within 1e-5 (fp32); a torchrun-launched
`nanoseek serve` that answers the openai client as a lone server does, outlives its collective timeout while
idle, and says so at once when a rank dies."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from serving import Server, free_port, make_model_dir

SCRIPT = """
import json, sys, torch
from nanoseek import SamplingParams
from nanoseek.model.fp8_weights import resident_bytes
from nanoseek.serve.config import EngineConfig
from nanoseek.serve.engine import Engine
from nanoseek.serve.launch import expert_modules, from_env
from nanoseek.serve.parallel import DataParallelFront, run_worker
folder, weights, drafts, redundant, load, rebalance, out = sys.argv[1:]
drafts, redundant, rebalance = int(drafts), int(redundant), int(rebalance)
cfg = EngineConfig(weights=weights, cache_memory_mb=16, speculative_tokens=drafts, enforce_eager=True,
                   redundant_experts=redundant, expert_load=load or None)
ranks = from_env()
engine = Engine(folder, config=cfg, model_parallel=True)
experts = sum(resident_bytes(m) for m in expert_modules(engine.model))
rank = ranks.rank if ranks else 0
def report(row):  # a file per row: ranks writing to one pipe interleave their lines
    with open(f"{out}/{row['rank']}.json", "w") as f:
        json.dump(row, f)
report({"rank": rank, "resident": resident_bytes(engine.model), "experts": experts})
if rank > 0:
    sys.exit(run_worker(engine))
front = DataParallelFront(engine) if ranks else engine
if rebalance:
    front.rebalance_after = rebalance
params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=None if drafts else 5)
prompts = [list(range(3, 40)), [7] * 20, list(range(100, 164)), [5, 6, 7, 8] * 5]
outs = front.generate(prompts + [p[::-1] for p in prompts], params)
stats = front.rank_stats()
report({"rank": "front", "tokens": [o.token_ids for o in outs],
                  "drafted": sum(s["drafted_tokens"] for s in stats),
                  "finished": [s["finished"] for s in stats],
                  "moe_bytes": sum(sum(s.get("moe_bytes", [])) for s in stats),
                  "moe_tokens": sum(sum(s.get("moe_tokens", [])) for s in stats),
                  "replica_pairs": sum(s.get("moe_replica_pairs", 0) for s in stats),
                  "placement": engine.exchange.placement if ranks else None,
                  "measured": getattr(front, "_load", None),
                  "logprobs": [[lp for lp, _ in o.logprobs] for o in outs],
                  "top": [[sorted(alt.values()) for _, alt in o.logprobs] for o in outs]})
front.close()
"""
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NANOSEEK_AUTO_DTYPE": "float32"}


def run(
    folder, weights: str, ranks: int, drafts: int = 0, redundant: int = 0, load: str = "", rebalance: int = 0
) -> dict:
    out = Path(tempfile.mkdtemp(dir=folder.parent))
    args = ["-c", SCRIPT, str(folder), weights, str(drafts), str(redundant), load, str(rebalance), str(out)]
    cmd = [sys.executable, *args] if ranks == 1 else [*TORCHRUN, str(ranks), "--no-python", sys.executable, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(path.read_text()) for path in out.glob("*.json")]
    return {row["rank"]: row for row in rows}


def close(xs, ys, tol=1e-5) -> bool:
    return all(abs(a - b) < tol for x, y in zip(xs, ys, strict=True) for a, b in zip(x, y, strict=True))


def test_two_ranks_serve_eight_requests_with_the_replies_of_one_process(tmp_path, tokenizer):
    """Data-parallel attention: each rank runs its own engine on the requests given to it (both get some),
    each MoE layer exchanges tokens with the rank holding their experts: the tokens of one process, the
    log-probabilities within 1e-5 (fp32)."""
    folder = make_model_dir(tmp_path / "model", tokenizer)
    alone, split = run(folder, "fp32", 1), run(folder, "fp32", 2)
    assert split["front"]["tokens"] == alone["front"]["tokens"]
    assert close(alone["front"]["logprobs"], split["front"]["logprobs"])
    assert all(close(p, q) for p, q in zip(alone["front"]["top"], split["front"]["top"], strict=True))
    assert all(n > 0 for n in split["front"]["finished"]) and sum(split["front"]["finished"]) == 8
    # Every rank holds half of the routed experts, and everything else.
    whole, experts = alone[0]["resident"], alone[0]["experts"]
    for rank in (0, 1):
        assert split[rank]["experts"] * 2 == experts and split[rank]["resident"] == whole - experts // 2


def test_the_all_to_all_moves_at_most_k_copies_per_token_where_the_broadcast_moved_n_minus_1(tmp_path, tokenizer):
    """Bytes per token and MoE layer, measured at 2 and 4 ranks. All-to-all: a token travels only to the other ranks
    holding its chosen experts, at most min(k, N - 1) of them (k = 2 of 8 experts here), as a row and its routing,
    and comes back as an fp32 sum from each; the broadcast design it replaced sent every token to all N - 1 other
    ranks. So the share of the broadcast falls (about k / (N - 1) for large N) while the bytes themselves grow
    with N towards the k-copy bound: they do not fall as 1 / N."""
    folder = make_model_dir(tmp_path / "model", tokenizer)
    alone = run(folder, "fp32", 1)["front"]
    hidden, k = 128, 2  # the tiny preset, fp32
    unit = hidden * 4 + (1 + 2 * k) * 4 + hidden * 4  # a row and its routing (layer, experts, weights), a sum back
    per_token, share = {}, {}
    for n in (2, 4):
        split = run(folder, "fp32", n)["front"]
        assert split["tokens"] == alone["tokens"]
        broadcast = (n - 1) * (hidden * 4 + k * (4 + 8) + hidden * 4)  # row, routing (fp32 weight, int64 index), sum
        per_token[n] = split["moe_bytes"] / split["moe_tokens"]
        share[n] = per_token[n] / broadcast
        assert 0 < per_token[n] <= min(k, n - 1) * unit, (n, per_token[n])
    assert share[4] < share[2] < 1 and per_token[4] > per_token[2], (per_token, share)


def test_mtp_speculative_decoding_over_ranks_gives_the_plain_greedy_tokens(tmp_path, tokenizer):
    """The MTP module's MoE layer is exchanged too (ranks reach it in their own time): no token changes."""
    folder = make_model_dir(tmp_path / "model", tokenizer)
    drafted = run(folder, "fp32", 2, drafts=1)["front"]
    assert drafted["tokens"] == run(folder, "fp32", 1)["front"]["tokens"] and drafted["drafted"] > 0


def test_redundant_copies_of_the_hottest_experts_take_their_share_and_change_no_reply(tmp_path, tokenizer):
    """--redundant-experts 2 with a load file where experts 0 and 1 (both on rank 0) are hot: rank 1 gets
    copies of them, computes some of their pairs, and the replies are one process's; at exit the load
    measured while serving is added to the file."""
    folder = make_model_dir(tmp_path / "model", tokenizer)
    load_file = tmp_path / "load.json"
    layers = 2  # the model's MoE layers: its second layer (the first is dense) and the MTP module's
    load_file.write_text(json.dumps({"layers": [[1000, 900] + [10] * 6] * layers}))
    alone = run(folder, "fp32", 1)["front"]
    split = run(folder, "fp32", 2, redundant=2, load=str(load_file))["front"]
    assert split["tokens"] == alone["tokens"] and split["replica_pairs"] > 0
    written = json.loads(load_file.read_text())["layers"]
    assert written[0][:2] != [1000, 900] and sum(written[0]) > 1000 + 900 + 60  # the served pairs were added


def test_without_a_load_file_the_copies_are_planned_from_the_load_measured_while_serving(tmp_path, tokenizer):
    """--redundant-experts 2 and no --expert-load: after `rebalance_after` steps (REBALANCE_AFTER, 64, in a server;
    3 here) the front gathers the (token, expert) pairs every rank measured and places copies of each layer's two
    hottest experts by them; the copies compute pairs from then on, and the replies are one process's."""
    from nanoseek.serve.exchange import plan_replicas

    folder = make_model_dir(tmp_path / "model", tokenizer)
    alone = run(folder, "fp32", 1)["front"]
    split = run(folder, "fp32", 2, redundant=2, rebalance=3)["front"]
    assert split["tokens"] == alone["tokens"]
    measured = split["measured"]
    assert measured is not None and sum(measured[0]) > 0  # (the MTP module's layer, [1], ran no drafts: zeros)
    assert split["placement"] == plan_replicas(measured, 2, 2)  # copies from what was measured, not a file
    assert all(sum(len(ranks) > 1 for ranks in layer) == 2 for layer in split["placement"])
    assert split["replica_pairs"] > 0


def test_a_malformed_load_file_is_refused_naming_the_file_and_the_expected_shape(tmp_path):
    from nanoseek.serve.parallel import read_load

    path = tmp_path / "load.json"
    bad = {
        "not JSON": "{layers: [[1, 2]]",
        "no layers": json.dumps({"experts": [[1] * 8] * 2}),
        "a list": json.dumps([[1] * 8] * 2),
        "ragged": json.dumps({"layers": [[1] * 8, [1] * 7]}),
        "text counts": json.dumps({"layers": [["1"] * 8] * 2}),
        "fractions": json.dumps({"layers": [[1.5] * 8] * 2}),
        "negative": json.dumps({"layers": [[-1] + [1] * 7] * 2}),
        "booleans": json.dumps({"layers": [[True] * 8] * 2}),
        "NaN": json.dumps({"layers": [[float("nan")] * 8] * 2}),
        "past int64": json.dumps({"layers": [[2**63] * 8] * 2}),
        "layers a dict": json.dumps({"layers": {"0": [1] * 8}}),
        "flat": json.dumps({"layers": [1] * 8}),
        "wrong shape": json.dumps({"layers": [[1] * 8] * 3}),
    }
    for what, text in bad.items():
        path.write_text(text)
        with pytest.raises(ValueError, match="--expert-load") as error:
            read_load(path, (2, 8))
            pytest.fail(f"{what}: accepted")
        message = str(error.value)
        assert str(path) in message and ("(2, 8)" in message or "[pairs per expert]" in message), (what, message)
    path.write_text(json.dumps({"layers": [[3] * 8, [0] * 8]}))
    assert read_load(path, (2, 8)) == [[3] * 8, [0] * 8]
    with pytest.raises(ValueError, match="--expert-load"):
        read_load(tmp_path / "missing.json", (2, 8))


def test_the_replica_plan_copies_the_hottest_experts_away_from_home():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from nanoseek.serve.exchange import plan_replicas

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.integers(0, 10_000), min_size=8, max_size=8), st.integers(1, 4), st.sampled_from([2, 4]))
    def check(counts, redundant, world):
        (placement,) = plan_replicas([counts], redundant, world)
        copied = [e for e, ranks in enumerate(placement) if len(ranks) > 1]
        hottest = sorted(range(8), key=lambda e: -counts[e])[:redundant]
        assert sorted(copied) == sorted(hottest)
        assert all(ranks[0] == e // (8 // world) and len(set(ranks)) == len(ranks) for e, ranks in enumerate(placement))

    check()


def routing_front(world: int):
    """A DataParallelFront over a stand-in engine: its choice of rank alone, no process group."""
    import torch

    from nanoseek.serve.config import EngineConfig
    from nanoseek.serve.engine import Engine
    from nanoseek.serve.launch import Ranks
    from nanoseek.serve.parallel import DataParallelFront

    class Stand:
        ranks = Ranks(0, world, torch.device("cpu"))
        config = EngineConfig()
        fingerprint = b"a model"
        cache_root = Engine.cache_root

        def rank_stats(self) -> list[dict]:
            return [{}]

        def _encode(self, prompt):
            return prompt

        def check_request(self, ids, params) -> None:
            pass

    return DataParallelFront(Stand())


def test_a_shared_system_prompt_spreads_over_the_ranks():
    """16 requests whose prompts share a 128-token system prompt, then differ: a block match once sent all of them
    to the rank that took the first (the others idle); now both ranks hold the head after a few, and the load is
    even."""
    front = routing_front(2)
    system = list(range(1000, 1128))
    for i in range(16):
        front.add_request(system + [i] * 30)
    assert sorted(front.load) == [8, 8], front.load


def test_choose_rank_follows_the_cached_prefix_while_its_rank_is_not_much_busier():
    """No cached block: the least loaded rank (ties to the lower); a prompt whose leading 64-token blocks went to
    a rank goes there again (the longest run of blocks wins, the least loaded of its holders); another cache salt
    never matches; the cached rank is left for the least loaded one only past both balance thresholds."""
    from nanoseek.serve.parallel import BALANCE_ABS, BALANCE_REL, pick_rank

    front = routing_front(4)
    head, tail, other = list(range(64)), list(range(64, 128)), list(range(500, 564))
    front.load = [1, 1, 0, 0]
    assert front.choose_rank(head + tail, None) == 2  # nothing cached: the least loaded, the lower of 2 and 3
    front.load = [0, 0, 1, 0]
    assert front.choose_rank(head + tail + [7], None) == 2  # both blocks cached on 2, one request busier: there
    assert front.choose_rank(head + tail, "another key") == 0  # no match across salts
    assert front.choose_rank(head + other, None) == 2  # the head matches on 2
    front.load = [0, 0, 9, 0]
    assert front.choose_rank(head, None) == 0  # 2 is past both thresholds: the least loaded, which now holds head
    front.load = [0, 0, 2, 0]
    assert front.choose_rank(head + tail, None) == 2  # 2 holds both blocks, 0 only the first: the longer run
    assert front.choose_rank(head, None) == 0  # the first block alone: held by 0 and 2, 0 less loaded
    assert front.choose_rank(list(range(40)), None) == 0  # under a block: nothing to match
    # the balance rule alone
    low = 20
    assert pick_rank([low + BALANCE_ABS, low], {0}) == 0  # within the absolute slack
    assert pick_rank([int(low * BALANCE_REL), low], {0}) == 0  # within the relative one
    assert pick_rank([int(low * BALANCE_REL) + 1, low], {0}) == 1  # past both: the least loaded
    assert pick_rank([BALANCE_ABS + 1, 0], {0}) == 1  # an idle rank takes it
    assert pick_rank([3, 3, 3], set()) == 0 and pick_rank([3, 1, 1], {0, 2}) == 2


def test_fp8_resident_weights_split_over_ranks_decode_as_one_process(tmp_path):
    import torch

    from nanoseek import Transformer, get_preset
    from nanoseek.checkpoint import save_pretrained

    torch.manual_seed(0)
    save_pretrained(Transformer(get_preset("tiny")), tmp_path, fp8=True)
    assert run(tmp_path, "fp8", 2)["front"]["tokens"] == run(tmp_path, "fp8", 1)["front"]["tokens"]


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Launch:
    """`torchrun --nproc-per-node N -m nanoseek serve ...` on a free port, up once /health says ok."""

    def __init__(self, folder, log, ranks: int = 2, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [*TORCHRUN, str(ranks), "-m", "nanoseek", "serve", "--model", str(folder), "--port", str(self.port)]
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--enforce-eager", *args], stdout=out, stderr=subprocess.STDOUT, env=ENV
            )
        deadline = time.monotonic() + 120
        while not healthy(self.url):
            assert self.proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=60)


def rank_process(torchrun: int, rank: int) -> int:
    """The pid of a torchrun launch's worker of this rank (Linux /proc: its parent and its RANK variable)."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == torchrun and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise LookupError(f"no rank {rank} under {torchrun}")


def ask(url: str, content: str, max_tokens: int = 8) -> str:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": content}]
    reply = c.chat.completions.create(model="nanoseek", messages=messages, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def test_a_torchrun_launched_server_answers_as_a_lone_server_and_outlives_its_timeout_idle(tmp_path, tokenizer):
    """8 concurrent requests over 2 ranks (both serve some, /metrics says which), the replies of a lone
    server; then idle for 3x --dist-timeout, and it still answers."""
    from concurrent.futures import ThreadPoolExecutor

    folder = make_model_dir(tmp_path / "model", tokenizer)
    questions = [f"Question {i}: what is {i} + {i}?" for i in range(8)]
    with Server(folder, env={"NANOSEEK_AUTO_DTYPE": "float32"}) as lone:
        expected = [ask(lone.url, q) for q in questions]
    launch = Launch(folder, tmp_path / "log", 2, "--dist-timeout", "5")
    try:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda q: ask(launch.url, q), questions)) == expected
        metrics = httpx.get(launch.url + "/metrics", timeout=10).text
        finished = {
            line.split('rank="')[1].split('"')[0]: float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("nanoseek_rank_requests_finished_total{")
        }
        assert finished.keys() == {"0", "1"} and all(n > 0 for n in finished.values()), finished
        assert 'nanoseek_moe_dispatched_tokens_total{layer="0",rank="1"}' in metrics
        time.sleep(16)  # idle past 3 x the data plane's timeout: the control plane's heartbeat keeps it alive
        assert healthy(launch.url) and ask(launch.url, questions[0]) == expected[0]
    finally:
        launch.stop()


def test_a_killed_worker_turns_health_unhealthy_and_leaves_no_request_hanging(tmp_path, tokenizer):
    """kill -9 of rank 1 while a long request runs: that request ends at once (a 503, or the connection
    closing as torchrun brings the launch down), /health stops saying ok within 20 s, nothing hangs."""
    import signal

    folder = make_model_dir(tmp_path / "model", tokenizer)
    launch = Launch(folder, tmp_path / "log", 2)
    try:
        worker = rank_process(launch.proc.pid, 1)
        client = openai.OpenAI(base_url=launch.url + "/v1", api_key="x", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Tell me everything."}]
        stream = client.chat.completions.create(model="nanoseek", messages=messages, max_tokens=900, stream=True)
        next(iter(stream))  # the request is running
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        try:
            for _ in stream:
                pass
        except (openai.APIError, httpx.HTTPError):
            pass
        assert time.monotonic() - start < 20  # it ended: no hang
        deadline = time.monotonic() + 20
        while healthy(launch.url):
            assert time.monotonic() < deadline, "/health still says ok 20 s after a rank died"
            time.sleep(0.2)
        try:
            with pytest.raises(openai.APIError) as error:
                ask(launch.url, "and now?")
            assert getattr(error.value, "status_code", 503) == 503
        except openai.APIConnectionError:
            pass  # the launch is already down: refused, not hung
        launch.proc.wait(timeout=60)  # torchrun brings the launch down
    finally:
        launch.stop()


class BareLaunch:
    """`nanoseek serve` as N gloo ranks without torchrun: each rank a process of its own (WORLD_SIZE, RANK and the
    rendezvous set by hand), so that when one rank dies the others meet it alone; torchrun would stop them all at
    once and hide what they do."""

    def __init__(self, folder, tmp_path, ranks: int = 2):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "launch.log"
        cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(folder), "--port", str(self.port)]
        rendezvous = {"WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        env = {**ENV, **rendezvous, "XDG_DATA_HOME": str(tmp_path / "data")}
        with open(self.log, "wb") as out:
            self.procs = [
                subprocess.Popen(
                    [*cmd, "--enforce-eager"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                )
                for rank in range(ranks)
            ]
        deadline = time.monotonic() + 120
        while not healthy(self.url):
            alive = all(p.poll() is None for p in self.procs)
            assert alive and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.3)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def unavailable(payload: dict, port: int) -> str:
    """An engine_unavailable 503's body (or a stream's error event): OpenAI's envelope, naming no source file, host
    or port; its message."""
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "server_error" and error["code"] == "engine_unavailable", error
    message = error["message"]
    assert not re.search(r"\.(cc|cpp|h|py)\b|/|127\.0\.0\.1|localhost|:\d+|" + str(port), message), message
    return message


def test_a_dead_worker_fails_the_requests_in_flight_and_new_ones_with_a_503(tmp_path, tokenizer):
    """kill -9 of rank 1 while two requests run (a stream and a plain one), with rank 0 left alive (no torchrun to
    stop it): the stream ends with an error event and the plain request with a 503, both engine_unavailable in
    OpenAI's envelope with no internal path or port; /health is 503 with the reason; a new request gets the same
    503; rank 0 stays up to say so."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    folder = make_model_dir(tmp_path / "model", tokenizer)
    launch = BareLaunch(folder, tmp_path)
    chat = launch.url + "/v1/chat/completions"
    body = {"model": "nanoseek", "messages": [{"role": "user", "content": "Tell me everything."}]}
    body |= {"max_tokens": 900, "temperature": 0}
    try:
        with ThreadPoolExecutor(1) as pool, httpx.stream("POST", chat, json=body | {"stream": True}, timeout=60) as sse:
            plain = pool.submit(httpx.post, chat, json=body, timeout=60)
            events = (line[len("data: ") :] for line in sse.iter_lines() if line.startswith("data: "))
            next(events)  # the stream runs
            deadline = time.monotonic() + 30
            while httpx.get(launch.url + "/health", timeout=5).json()["running"] < 2:  # and so does the plain one
                assert time.monotonic() < deadline and not plain.done()
                time.sleep(0.1)
            os.kill(launch.procs[1].pid, signal.SIGKILL)
            start = time.monotonic()
            rest = list(events)
            reply = plain.result(timeout=20)
            assert time.monotonic() - start < 20  # no hang
        assert rest and rest[-1] != "[DONE]"
        port = launch.port
        reason = unavailable(json.loads(rest[-1]), port)
        assert reply.status_code == 503 and unavailable(reply.json(), port) == reason
        health = httpx.get(launch.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert health.json()["reason"] and health.json()["reason"] in reason
        again = httpx.post(chat, json=body, timeout=20)
        assert again.status_code == 503 and unavailable(again.json(), port) == reason
        assert launch.procs[0].poll() is None  # rank 0 is up, saying why it cannot serve
    finally:
        launch.stop()


def test_the_worker_exits_when_rank_0_dies(tmp_path, tokenizer):
    """kill -9 of rank 0 (no torchrun to stop the rest): the idle worker, waiting on the control plane whose timeout
    is days, sees rank 0's sockets close and exits on its own within seconds, with a non-zero code."""
    import signal

    folder = make_model_dir(tmp_path / "model", tokenizer)
    launch = BareLaunch(folder, tmp_path)
    try:
        time.sleep(2)  # a few idle heartbeats
        os.kill(launch.procs[0].pid, signal.SIGKILL)
        start = time.monotonic()
        code = launch.procs[1].wait(timeout=30)
        assert time.monotonic() - start < 15 and code != 0, launch.log.read_text()[-3000:]
    finally:
        launch.stop()


def test_an_engine_joins_a_torchrun_launch_only_when_asked(tmp_path, tokenizer):
    """distill, eval and the speedrun build engines too: under torchrun they must not join the launch."""
    folder = make_model_dir(tmp_path / "model", tokenizer)
    code = (
        "import torch; from nanoseek import Engine, SamplingParams; "
        f"e = Engine({str(folder)!r}, device='cpu', dtype=torch.float32, enforce_eager=True); "
        "out = e.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0)); "
        "print(len(out[0].token_ids))"
    )
    env = {
        **ENV,
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "2", result.stderr[-2000:]
