"""Serving on a torchrun launch as DeepSeek serves V3: data-parallel attention, expert parallelism by
all-to-all (gloo on CPU, NCCL on CUDA).

    torchrun --nproc-per-node 8 -m nanoseek serve --model /models/DeepSeek-V3 --weights fp8

Every rank holds the attention, dense layers, shared experts, embedding and head, and E / N of the routed
experts, and runs an engine of its own (scheduler, paged latent cache, prefix cache, sampler) on the requests
given to it. Rank 0 also runs the HTTP front: it hands each request to a rank (`choose_rank`: of the ranks
with most of its prompt's leading blocks cached, the least loaded, unless it is well above the least loaded rank
of all: `pick_rank`) and streams that rank's output back. Each MoE layer sends a token only to the ranks that
hold its experts (serve/exchange.py); a rank without work steps with nothing to send, so that the collectives
line up.

Two planes, two process groups:
- the data plane (each MoE layer's exchange) on the default group, whose collectives time out after
  `--dist-timeout` seconds;
- the control plane (requests, outputs, shutdown, a heartbeat every second while idle) on a gloo group with
  a timeout of days, so that an idle server lives indefinitely. When a rank dies, the next control round
  fails at once (the peer's socket closes): rank 0 fails every request with a 503, `/health` says why, and
  the launch comes down; when rank 0 dies, the workers' round fails and they exit.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from nanoseek.serve.config import EngineConfig
from nanoseek.serve.engine import Engine, RequestOutput
from nanoseek.serve.exchange import plan_replicas
from nanoseek.serve.kv_cache import block_hash
from nanoseek.serve.launch import LaunchLost, from_env, leave
from nanoseek.serve.output import releasable
from nanoseek.serve.sampling import SamplingParams

log = logging.getLogger("nanoseek.serve")

HEARTBEAT_S = 1.0  # rank 0 rounds at least this often, so that a dead rank is noticed while idle
ROUTE_BLOCK = 64  # prompt blocks the front remembers per rank, to send a prompt where its prefix is cached
ROUTE_MEMORY = 65_536  # remembered blocks, the oldest forgotten first
REBALANCE_AFTER = 64  # steps of measured expert load before --redundant-experts places copies (no load file)
# A rank with the prompt's prefix cached is preferred while its load (live requests) is within BALANCE_ABS of the
# least loaded rank's, or within BALANCE_REL times it (SGLang's cache-aware router: balance_abs_threshold 64,
# balance_rel_threshold 1.5; its absolute slack is for routers over whole servers, a rank runs at most max_seqs).
BALANCE_ABS = 4
BALANCE_REL = 1.5


# --- the control plane's messages ------------------------------------------------------------------------
@dataclass(slots=True)
class Add:
    rank: int
    request_id: str
    ids: list[int]
    params: SamplingParams
    cache_salt: str | bytes | None


@dataclass(slots=True)
class Orders:
    """Rank 0 to every rank, once a round: requests to start and cancel, whether to step, whether to stop;
    a placement of redundant experts to take before stepping; whether to report the measured expert load."""

    adds: list[Add] = field(default_factory=list)
    cancels: list[tuple[int, str]] = field(default_factory=list)
    step: bool = False
    stop: bool = False
    placement: list[list[list[int]]] | None = None
    want_load: bool = False


@dataclass(slots=True)
class Report:
    """Every rank to rank 0, once a round: its requests' outputs, requests it refused, its load and counters."""

    rank: int
    outputs: list[RequestOutput]
    refused: list[tuple[str, str]]
    has_work: bool
    stats: dict
    load: list[list[int]] | None = None  # (token, expert) pairs per MoE layer and expert, when asked


class RankEngine:
    """One rank's engine and its part of the exchange: it applies rank 0's orders and steps its own requests,
    then answers the other ranks' MoE rounds until every rank's step is over."""

    def __init__(self, engine: Engine):
        self.engine, self.rank = engine, engine.ranks.rank

    def serve(self, orders: Orders) -> Report:
        engine, refused, outputs = self.engine, [], []
        if orders.placement is not None:
            engine.exchange.replicate(orders.placement)
        for add in orders.adds:
            if add.rank == self.rank:
                try:
                    engine.add_request(add.ids, add.params, request_id=add.request_id, cache_salt=add.cache_salt)
                except ValueError as e:
                    refused.append((add.request_id, str(e)))
        for rank, request_id in orders.cancels:
            if rank == self.rank and (out := engine.cancel(request_id)) is not None:
                outputs.append(out)
        if orders.step:
            try:
                outputs += engine.step()
            finally:  # the other ranks may still be in their step's rounds
                engine.exchange.finish(engine.model.embed_tokens.weight)
        load = engine.exchange.metrics.load.tolist() if orders.want_load else None
        return Report(self.rank, outputs, refused, engine.scheduler.has_work(), engine.rank_stats()[0], load)


def run_worker(engine: Engine) -> int:
    """A rank > 0: follow rank 0's orders until it says stop (or is gone); the exit code."""
    ranks, rank_engine = engine.ranks, RankEngine(engine)
    try:
        while True:
            box: list = [None]
            dist.broadcast_object_list(box, src=0, group=ranks.control)
            orders: Orders = box[0]
            if orders.stop:
                return 0
            report = rank_engine.serve(orders)
            dist.gather_object(report, None, dst=0, group=ranks.control)
    except (RuntimeError, ConnectionError) as e:  # rank 0 (or another rank) is gone
        log.error("rank %d: the launch is gone (%s); exiting", ranks.rank, e)
        return 1
    finally:
        engine.close()
        leave()


class DataParallelFront:
    """Rank 0's engine for the server and the terminal: the Engine API (add_request, cancel, step, generate,
    stream, stats, close) over every rank's engine. Anything else is the local engine's (tokenizer, model,
    check_request, ...): every rank serves the same model with the same settings."""

    heartbeat_s = HEARTBEAT_S
    rebalance_after = REBALANCE_AFTER

    def __init__(self, engine: Engine):
        self.engine, self.ranks = engine, engine.ranks
        self.local = RankEngine(engine)
        self.world = self.ranks.world
        self.where: dict[str, int] = {}  # live request -> its rank
        self.load = [0] * self.world  # live requests per rank
        self.busy = [False] * self.world  # whether a rank had work after the last round
        self.stats_by_rank: list[dict] = engine.rank_stats() * self.world
        self.blocks: OrderedDict[bytes, set[int]] = OrderedDict()  # prompt block hash -> the ranks sent it
        self.failed: str | None = None
        self._orders = Orders()
        self._last_round = time.monotonic()
        self._ids = 0
        self._steps = 0  # rounds in which the ranks stepped
        self._load: list[list[int]] | None = None  # the expert load gathered by the last round that asked
        self.redundant = engine.config.redundant_experts
        self.load_file = Path(engine.config.expert_load) if engine.config.expert_load else None
        self.replicated = False
        if self.redundant and self.load_file is not None and self.load_file.is_file():
            self._replicate(read_load(self.load_file, engine.exchange.metrics.load.shape))

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    # --- requests ----------------------------------------------------------------------------------------
    def choose_rank(self, ids: list[int], cache_salt: str | bytes | None) -> int:
        """The rank for a new request (`pick_rank`'s rule), remembered as holding its prompt's blocks. The seam
        for a smarter router (load in tokens, a queue model)."""
        parent, hashes = self.engine.cache_root(cache_salt), []
        for start in range(0, len(ids) - ROUTE_BLOCK + 1, ROUTE_BLOCK):
            parent = block_hash(parent, ids[start : start + ROUTE_BLOCK])
            hashes.append(parent)
        holders: set[int] = set()  # the ranks holding the longest run of leading blocks
        for i, h in enumerate(hashes):
            longer = self.blocks.get(h, set()) & (holders if i else set(range(self.world)))
            if not longer:
                break
            holders = longer
        best = pick_rank(self.load, holders)
        for h in hashes:  # that rank will have these blocks
            self.blocks.setdefault(h, set()).add(best)
            self.blocks.move_to_end(h)
        while len(self.blocks) > ROUTE_MEMORY:
            self.blocks.popitem(last=False)
        return best

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_salt: str | bytes | None = None,
    ) -> str:
        if self.failed is not None:
            raise LaunchLost(self.failed)
        params = params or SamplingParams()
        ids = self.engine._encode(prompt)
        self.engine.check_request(ids, params)  # every rank has the same model and limits
        if request_id is None:
            request_id, self._ids = f"dp-{self._ids}", self._ids + 1
        rank = self.choose_rank(ids, cache_salt)
        self.where[request_id] = rank
        self.load[rank] += 1
        self._orders.adds.append(Add(rank, request_id, ids, params, cache_salt))
        return request_id

    def cancel(self, request_id: str) -> None:
        rank = self.where.get(request_id)
        if rank is not None:
            self._orders.cancels.append((rank, request_id))

    @property
    def sequences(self) -> dict[str, int]:
        return self.where

    def has_work(self) -> bool:
        return bool(self._orders.adds or self._orders.cancels or any(self.busy))

    def has_unfinished(self) -> bool:
        return bool(self.where)

    # --- rounds --------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One round: the orders out, every rank's step (those without work answer the others' MoE rounds),
        the reports back. Raises LaunchLost when a rank is gone or the data plane timed out."""
        if self.failed is not None:
            raise LaunchLost(self.failed)
        orders, self._orders = self._orders, Orders()
        orders.step = bool(orders.adds) or any(self.busy)
        try:
            dist.broadcast_object_list([orders], src=0, group=self.ranks.control)
            mine = self.local.serve(orders)
            reports: list = [None] * self.world
            dist.gather_object(mine, reports, dst=0, group=self.ranks.control)
        except (RuntimeError, ConnectionError) as e:
            self.failed = f"a rank of this launch is gone or timed out ({type(e).__name__})"
            log.error("%s: %s", self.failed, e)
            raise LaunchLost(self.failed) from e
        self._last_round = time.monotonic()
        self._steps += orders.step
        outputs = []
        if orders.want_load:
            self._load = sum(torch.tensor(r.load) for r in reports).tolist()
        for report in reports:
            self.busy[report.rank] = report.has_work
            self.stats_by_rank[report.rank] = report.stats
            for request_id, message in report.refused:
                outputs.append(RequestOutput(request_id, [], [], "", "error", error=message))
            outputs += report.outputs
        for out in outputs:
            if out.finish_reason is not None and (rank := self.where.pop(out.request_id, None)) is not None:
                self.load[rank] -= 1
        self._plan_redundancy(orders)
        return outputs

    # --- redundant experts (EPLB) ---------------------------------------------------------------------------
    def _plan_redundancy(self, orders: Orders) -> None:
        """With --redundant-experts and no load file: after `rebalance_after` steps, ask the ranks for the load
        they measured, and with it place the copies (once)."""
        if not self.redundant or self.replicated:
            return
        if orders.want_load and self._load is not None:
            self._replicate(self._load)
        elif self._steps >= self.rebalance_after:
            self._orders.want_load = True

    def _replicate(self, load: list[list[int]]) -> None:
        placement = plan_replicas(load, self.redundant, self.world)
        self._orders.placement, self.replicated = placement, True
        hot = [[e for e, ranks in enumerate(layer) if len(ranks) > 1] for layer in placement]
        log.info("redundant experts per MoE layer (from the measured load): %s", hot)

    def _write_load(self) -> None:
        """At exit: the load measured while serving, added to the file's (so that a restart places copies)."""
        self.replicated = True  # (this last round's load is for the file, not for placing copies now)
        self._orders.want_load = True
        self.step()
        load = torch.tensor(self._load)
        if self.load_file.is_file():
            load += torch.tensor(read_load(self.load_file, load.shape))
        self.load_file.write_text(json.dumps({"layers": load.tolist()}))

    def idle(self) -> None:
        """While nothing runs: a heartbeat round every HEARTBEAT_S, so that a dead rank is noticed."""
        if time.monotonic() - self._last_round >= self.heartbeat_s:
            self.step()

    def close(self) -> None:
        """Stop every rank (they exit their loops) and leave the launch."""
        try:
            if self.failed is None:
                if self.load_file is not None:
                    self._write_load()
                dist.broadcast_object_list([Orders(stop=True)], src=0, group=self.ranks.control)
        except (RuntimeError, ConnectionError):
            pass
        finally:
            self.engine.close()
            leave()

    # --- the Engine's conveniences -----------------------------------------------------------------------
    generate = Engine.generate  # it needs only add_request and step, which the front has

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        params = params or SamplingParams()
        request_id, sent = self.add_request(prompt, params), 0
        hold = max((len(s) for s in params.stop), default=1) - 1
        while True:
            out = next((o for o in self.step() if o.request_id == request_id), None)
            if out is None:
                continue
            ready = len(out.text) if out.finish_reason else releasable(out.text, hold)
            if ready > sent:
                yield out.text[sent:ready]
                sent = ready
            if out.finish_reason:
                return

    def rank_stats(self) -> list[dict]:
        """Each rank's Engine.rank_stats, as of the last round."""
        return self.stats_by_rank

    def stats(self) -> dict:
        """The launch's totals (counts summed over the ranks, fractions averaged), as Engine.stats."""
        per = self.stats_by_rank
        total = {k: sum(s[k] for s in per) for k, v in per[0].items() if isinstance(v, (int, float)) and k != "rank"}
        for k in ("cache_use", "mean_ttft_s", "mean_itl_s", "tokens_per_step", "spec_acceptance"):
            total[k] = sum(s[k] for s in per) / len(per)
        total["spec_acceptance_by_position"] = per[0]["spec_acceptance_by_position"]
        return total


def pick_rank(load: list[int], holders: set[int]) -> int:
    """The rank for a request, given each rank's load (live requests) and the ranks holding the longest cached
    prefix of its prompt (empty: none holds any). Of the holders, the least loaded, while its load is not much
    above the least loaded rank's: within BALANCE_ABS requests of it, or BALANCE_REL times it (SGLang's
    cache-aware router switches to the shortest queue past both thresholds); else the least loaded rank. Ties
    go to the lower rank. So a system prompt that every request shares is cached on more ranks as the load
    grows, instead of sending every request to the rank that took the first."""
    least = min(range(len(load)), key=lambda r: (load[r], r))
    if not holders:
        return least
    cached = min(holders, key=lambda r: (load[r], r))
    near = load[cached] - load[least] <= BALANCE_ABS or load[cached] <= BALANCE_REL * load[least]
    return cached if near else least


def read_load(path: Path, shape: tuple[int, int]) -> list[list[int]]:
    """An --expert-load file: {"layers": [[pairs per expert] per MoE layer]}, of shape [MoE layers, experts]
    (the MTP module's MoE layer last), counts whole and >= 0. Anything else is refused, naming the file and why."""
    expected = f'expected {{"layers": [[pairs per expert], ...]}} of shape {tuple(shape)} (MoE layers, experts)'

    def refused(why: str) -> ValueError:
        return ValueError(f"--expert-load {path}: {why}; {expected}")

    try:
        layers = json.loads(path.read_text())["layers"]
    except OSError as e:
        raise refused(f"cannot be read ({e.strerror})") from None
    except ValueError as e:  # not JSON (or not text)
        raise refused(f"not JSON ({e})") from None
    except (KeyError, TypeError):
        raise refused('no "layers" in it') from None
    if not isinstance(layers, list) or not all(isinstance(layer, list) for layer in layers):
        raise refused('"layers" is not a list of lists')
    if any(type(n) is not int or not 0 <= n < 2**63 for layer in layers for n in layer):
        raise refused("a count is not a whole number >= 0")
    if len({len(layer) for layer in layers}) > 1:
        raise refused("its layers differ in length")
    found = (len(layers), len(layers[0]) if layers else 0)
    if found != tuple(shape):
        raise ValueError(
            f"--expert-load {path} holds {found} (MoE layers, experts); this model has {tuple(shape)} "
            "(its MTP module's MoE layer last): measure it again for this model"
        )
    return layers


def run_as_worker(model: str, config: EngineConfig, block_size: int = 16) -> int | None:
    """Under torchrun, a rank > 0 runs its engine on rank 0's orders until rank 0 stops, and returns its exit
    code; rank 0 and a lone process get None and go on to `engine_for`."""
    ranks = from_env(timeout_s=config.dist_timeout)
    if ranks is None or ranks.rank == 0:
        return None
    return run_worker(Engine(model, config=config, block_size=block_size, model_parallel=True))


def engine_for(model: str, config: EngineConfig, block_size: int = 16) -> Engine | DataParallelFront:
    """The engine of `generate`, `chat` and `serve`: alone, an Engine; on rank 0 of a torchrun launch, the
    front over every rank's engine."""
    engine = Engine(model, config=config, block_size=block_size, model_parallel=True)
    return DataParallelFront(engine) if engine.ranks is not None else engine
