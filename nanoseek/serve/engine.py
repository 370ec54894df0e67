"""The inference engine: it adds, cancels, steps, generates and streams requests, and owns each one's
lifetime (a finished request leaves the engine with its last output). The parts: the scheduler
(continuous batching), the paged latent cache and its prefix tiers, the model runner (absorbed-MLA
forward pass, batched sampler, MTP drafts) and each request's incremental text (output.py).

    engine = nanoseek.Engine("runs/tiny/model")
    [out] = engine.generate(["def fib(n):"], nanoseek.SamplingParams(max_tokens=64, temperature=0))
    for delta in engine.stream("import os\\n", nanoseek.SamplingParams(max_tokens=32)): print(delta, end="")

With `cache_dir`, full prefix blocks also go to disk (prefix_cache.DiskCache) and are found there by later
requests and later processes with the same model; `add_request(..., cache_salt=key)` keeps each key's
prefixes apart. One `step()` schedules a batch (decodes plus prefill chunks), runs one forward pass over it through the
absorbed MLA (attention reads only cached latents), samples a token for every sequence whose prompt is
done, and retires finished sequences, freeing their blocks and returning their last outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.device import default_device
from nanoseek.model import Transformer
from nanoseek.serve import launch
from nanoseek.serve.config import EngineConfig
from nanoseek.serve.exchange import ExpertExchange, home_placement
from nanoseek.serve.grammar import Grammars
from nanoseek.serve.kv_cache import BlockManager, CacheSpec, LatentPool
from nanoseek.serve.loader import fingerprint, load_model, pack_for_decode
from nanoseek.serve.output import TextOutput, releasable
from nanoseek.serve.prefix_cache import DiskCache
from nanoseek.serve.runner import ModelRunner, RowResult
from nanoseek.serve.sampling import History, SamplingParams, needs_history
from nanoseek.serve.scheduler import ScheduledRow, Scheduler
from nanoseek.serve.sequence import Sequence, Status
from nanoseek.serve.speculative import draftable
from nanoseek.tokenizer import END_THINK, THINK, Tokenizer, load_tokenizer

log = logging.getLogger("nanoseek.serve")


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[tuple[float, dict[int, float] | None]] = field(default_factory=list)
    error: str | None = None  # set when finish_reason is "error": this request alone failed
    reasoning_content: str = ""  # the text before </think> of a reply that reasons (R1's format)
    content: str = ""  # the text after it (all of `text` for a reply that does not reason)
    reasoning_tokens: int = 0
    # With SamplingParams.prompt_logprobs: per prompt token its log-probability given the tokens before it
    # and the top alternatives there (None for the first token, which nothing predicts).
    prompt_logprobs: list[tuple[float, dict[int, float] | None] | None] = field(default_factory=list)
    tool_calls_at: tuple[int, int] | None = None  # where tool calls begin: (characters of content, tokens)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class EngineMetrics:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefix_hit_tokens: int = 0
    disk_hit_tokens: int = 0
    preemptions: int = 0
    finished: int = 0  # requests that left (done, stopped, cancelled or failed)
    decode_rows: int = 0  # (sequence, step) pairs that produced tokens
    drafted_tokens: int = 0  # speculative decoding: MTP drafts checked ...
    accepted_tokens: int = 0  # ... and kept
    drafted_at: list[int] = field(default_factory=list)  # per draft position (the first draft, the second, ...)
    accepted_at: list[int] = field(default_factory=list)
    # The latest 10,000 of each: seconds from arrival to first token, and between a request's tokens.
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    itl: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def count_drafts(self, drafted: int, accepted: int) -> None:
        """A row's verified drafts: the first `accepted` of `drafted` kept."""
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        missing = max(0, drafted - len(self.drafted_at))
        self.drafted_at += [0] * missing
        self.accepted_at += [0] * missing
        for j in range(drafted):
            self.drafted_at[j] += 1
            self.accepted_at[j] += j < accepted

    @property
    def acceptance_by_position(self) -> list[float]:
        """Of the drafts at each position, the share kept (a draft is kept only after every draft before it)."""
        return [a / d for a, d in zip(self.accepted_at, self.drafted_at, strict=True)]


class Engine:
    """`Engine(model, tokenizer=None, config=None, *, device, dtype, block_size, model_parallel, **settings)`:
    a model folder (or a Transformer in memory, e.g. GRPO's policy), with the settings of `config`
    (serve/config.py's EngineConfig) and any of its fields given by name (`Engine(dir, max_seqs=8)`)."""

    heartbeat_s: float | None = None  # how often a server's idle engine thread calls idle() (None: never)
    failed: str | None = None  # why this engine can no longer generate (a data-parallel launch that lost a rank)

    def __init__(
        self,
        model: str | Path | Transformer,
        tokenizer: Tokenizer | str | Path | None = None,
        config: EngineConfig | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        block_size: int = 16,
        model_parallel: bool = False,
        **settings,
    ):
        self.config = cfg = dataclasses.replace(config or EngineConfig(), **settings)
        self.device = torch.device(device) if device else default_device()
        model_dir = None if isinstance(model, Transformer) else Path(model)
        # Under torchrun (model_parallel) this is one rank's engine (serve/parallel.py): it holds E / N of the
        # routed experts and exchanges the tokens of each MoE layer with the other ranks.
        self.ranks = None
        if model_parallel and model_dir is not None:  # a plain "cuda" means this rank's GPU (LOCAL_RANK)
            local = self.device.type == "cuda" and self.device.index is None
            self.ranks = launch.from_env(None if local else self.device, cfg.dist_timeout)
            self.device = self.ranks.device if self.ranks else self.device
        if model_dir is None:
            self.model = model.to(self.device).eval()
        else:
            self.model = load_model(model_dir, self.device, dtype, cfg.weights, self.ranks)
            if tokenizer is None and (model_dir / "tokenizer.json").is_file():
                tokenizer = model_dir
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.exchange = None
        if self.ranks is not None:
            experts = launch.expert_modules(self.model)
            placement = home_placement(self.model.cfg.n_routed_experts, self.ranks.world, len(experts))
            k, rank, world = self.model.cfg.num_experts_per_tok, self.ranks.rank, self.ranks.world
            self.exchange = ExpertExchange(experts, k, rank, world, placement)
        if cfg.speculative_tokens and not self.model.mtp:
            raise ValueError("speculative decoding drafts with the MTP module, and this model has none")
        self.speculative_tokens = cfg.speculative_tokens
        self.spec = CacheSpec.for_model(self.model.cfg, self.model.embed_tokens.weight.dtype, fp8=cfg.fp8_cache)
        if cfg.speculative_tokens:  # the MTP block's attention keeps its own latents, as one more layer
            self.spec.layers += 1
        num_blocks = max(2, int(cfg.cache_memory_mb * 2**20) // (self.spec.bytes_per_token * block_size))
        self.block_manager = BlockManager(num_blocks, block_size)
        self.pool = LatentPool(self.spec, num_blocks * block_size + 1, self.device)  # + the runner's scratch slot
        # The weights' storage types too: the same folder held as int8 or FP8 computes other latents.
        layout = repr((self.spec, block_size, sorted({str(t.dtype) for t in self.model.state_dict().values()})))
        self.fingerprint = fingerprint(self.model, layout, model_dir, every_byte=cfg.cache_dir is not None)
        # Only the engine's own weights are packed: a model passed in may be training (GRPO's policy), and a
        # packed copy would go stale.
        own = model_dir is not None and self.ranks is None
        self.packed = own and pack_for_decode(self.model, self.device, cfg.pack_weights)
        # A captured graph cannot hold the per-layer collectives of a torchrun launch.
        eager = cfg.enforce_eager or self.ranks is not None
        self.eos_id = self.tokenizer.eos_id if self.tokenizer else self.model.cfg.eos_token_id
        self.grammars = Grammars(self.tokenizer, self.model.cfg.vocab_size) if self.tokenizer else None
        self.runner = ModelRunner(
            self.model,
            self.pool,
            block_size,
            self.device,
            eager,
            self.grammars,
            graph_tokens=1 + cfg.speculative_tokens,
        )
        self.disk_cache = None
        if cfg.cache_dir is not None:
            block_bytes = self.spec.bytes_per_token * block_size  # a file is this, a header and tensor names
            self.disk_cache = DiskCache(
                cfg.cache_dir, int(cfg.disk_cache_gb * 2**30), self.fingerprint, max_file_bytes=2 * block_bytes + 2**16
            )
            self.block_manager.on_register = self._persist_block
        load = self._load_block if self.disk_cache is not None else None
        copy = lambda src, dst: self.pool.copy_block(self._block_slots(src), self._block_slots(dst))  # noqa: E731
        self.scheduler = Scheduler(
            self.block_manager, cfg.max_batched_tokens, cfg.max_seqs, load_block=load, copy_block=copy
        )
        self.sequences: dict[str, Sequence] = {}  # the live requests; a finished one leaves with its output
        self.metrics = EngineMetrics()
        self._ids = itertools.count()

    # --- the prefix cache's tiers and namespaces ---------------------------------------------------
    def cache_root(self, cache_salt: str | bytes | None = None) -> bytes:
        """Where a namespace's prefix hash chains start; different salts never share a block."""
        salt = cache_salt.encode() if isinstance(cache_salt, str) else cache_salt or b""
        return hashlib.blake2b(self.fingerprint + b"\0" + salt, digest_size=16).digest()

    def _block_slots(self, block: int) -> slice:
        size = self.block_manager.block_size
        return slice(block * size, (block + 1) * size)

    def _persist_block(self, digest: bytes, block: int) -> None:
        if digest not in self.disk_cache:
            self.disk_cache.put(digest, self.pool.block_tensors(self._block_slots(block)))

    def _load_block(self, digest: bytes, block: int) -> bool:
        tensors = self.disk_cache.get(digest)
        return tensors is not None and self.pool.load_block(self._block_slots(block), tensors)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix in memory, e.g. after the model's weights were updated (RL)."""
        self.block_manager.forget_prefixes()

    def close(self) -> None:
        """Finish writing the disk cache (call before the process ends to keep every block)."""
        if self.disk_cache is not None:
            self.disk_cache.close()

    # --- requests --------------------------------------------------------------------------------
    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, with the numbers, if a request can never run; reads only fixed state."""
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + params.max_tokens > self.model.cfg.max_position_embeddings:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"{self.model.cfg.max_position_embeddings} positions"
            )
        if min(ids) < 0 or max(ids) >= self.model.cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.model.cfg.vocab_size})")
        if any(not 0 <= t < self.model.cfg.vocab_size for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must lie in [0, {self.model.cfg.vocab_size})")
        if params.grammar is not None and self.grammars is None:
            raise ValueError("a grammar constrains text: this engine has no tokenizer")
        size = self.block_manager.block_size
        if -(-(len(ids) + params.max_tokens + self.speculative_tokens) // size) > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt + max_tokens needs more KV cache than this engine holds "
                f"({self.block_manager.num_blocks * size} tokens): raise cache_memory_mb (--cache-memory-mb)"
            )

    def capture(self) -> None:
        """Compile the captured decode step of every batch bucket now, up to max_seqs (eager: nothing)."""
        self.runner.capture(self.scheduler.max_seqs)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_salt: str | bytes | None = None,
    ) -> str:
        params = params or SamplingParams()
        ids = self._encode(prompt)
        self.check_request(ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        think = self.tokenizer.tok.token_to_id(THINK) if self.tokenizer else None
        text = TextOutput(self.tokenizer, params.stop, reasoning=think is not None and ids[-1] == think)
        matcher = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        seq = Sequence(
            request_id,
            list(ids),
            params,
            text,
            generator=generator,
            matcher=matcher,
            cache_root=self.cache_root(cache_salt),
            history=History(ids, self.model.cfg.vocab_size, self.device) if needs_history(params) else None,
        )
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        self.metrics.prompt_tokens += len(ids)
        return request_id

    def cancel(self, request_id: str) -> RequestOutput | None:
        """Stop a request now: its cache blocks are freed at once; returns its last output."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "cancelled")
        return self._retire(seq)

    def has_unfinished(self) -> bool:
        return bool(self.sequences)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def idle(self) -> None:
        """Called by a server's engine thread while nothing runs (a data-parallel front sends a heartbeat)."""

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids, or a tokenizer")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def output(self, request_id: str) -> RequestOutput:
        """A live request's output so far."""
        return self._output(self.sequences[request_id])

    @staticmethod
    def _output(seq: Sequence) -> RequestOutput:
        text = seq.text
        content = text.content.removeprefix(END_THINK)  # a reply that closed its reasoning as text
        calls = None
        if text.tool_calls_at is not None:  # in content's characters
            chars, token = text.tool_calls_at
            calls = (chars - (text.reasoning_end or 0) - (len(text.content) - len(content)), token)
        return RequestOutput(
            seq.id,
            seq.prompt,
            seq.output,
            text.text,
            seq.finish_reason,
            seq.cached_prompt_tokens,
            list(seq.logprobs),
            seq.error,
            text.reasoning_text.removeprefix(THINK),
            content,
            text.reasoning_tokens,
            list(seq.prompt_logprobs),
            calls,
        )

    def _retire(self, seq: Sequence) -> RequestOutput:
        self.sequences.pop(seq.id, None)
        self.metrics.finished += 1
        return self._output(seq)

    # --- one engine step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Plan a batch, run it, apply its results; returns the outputs of the requests that got new tokens
        or finished (these leave)."""
        plan = self.scheduler.schedule()
        self.metrics.preemptions = self.scheduler.preemptions
        if not plan:
            return []
        outputs = self.update(plan, self.runner.execute(plan))
        if self.speculative_tokens:
            try:
                self._draft([row.seq for row in plan if row.seq.status is Status.RUNNING])
            except Exception:  # drafts only save time: without them every sequence still decodes correctly
                log.exception("MTP drafting failed; this step goes on without drafts")
        self.metrics.steps += 1
        return outputs

    def update(self, plan: list[ScheduledRow], results: list[RowResult]) -> list[RequestOutput]:
        """Apply a step's results: tokens appended and streamed as text, stops checked, finished sequences
        retired with their last outputs; a row that failed fails its request alone."""
        now, touched = time.perf_counter(), []
        for row, result in zip(plan, results, strict=True):
            try:
                if self._update_row(row, result, now):
                    touched.append(row.seq)
            except Exception as e:  # one request's parameters or state: it fails alone, the batch goes on
                log.error("request %s failed", row.seq.id, exc_info=e)
                row.seq.error = f"{type(e).__name__}: {e}"
                self.scheduler.finish(row.seq, "error")
                touched.append(row.seq)
        return [self._retire(seq) if seq.status is Status.FINISHED else self._output(seq) for seq in touched]

    def _update_row(self, row: ScheduledRow, result: RowResult, now: float) -> bool:
        """One row's results into its sequence; True when it emitted tokens or finished."""
        seq, n = row.seq, row.num_new
        if result.error is not None:
            raise result.error
        if result.prompt_logprobs is not None:
            if row.start == 0:  # (again, after a preemption: a recomputed prompt is scored again)
                seq.prompt_logprobs = [None]
            del seq.prompt_logprobs[row.start + 1 :]
            seq.prompt_logprobs += result.prompt_logprobs
        if not row.samples:  # a prefill chunk: nothing to sample yet
            seq.num_computed += n
            self._keep_hidden(seq, result.hidden[:n])
            self.scheduler.register_computed(seq)
            return False
        if seq.params.max_tokens == 0:  # the prompt was only to be scored
            seq.num_computed += n
            self.scheduler.finish(seq, "length")
            return True
        accepted = len(result.tokens) - 1  # drafts kept
        if row.drafts:
            self.metrics.count_drafts(len(row.drafts), accepted)
        elif seq.params.logprobs is not None:
            seq.logprobs.append((result.sampled.logprob, result.sampled.top_logprobs))
        self.metrics.decode_rows += 1
        seq.num_computed = row.start + n + accepted  # the fed token and the accepted drafts
        if result.hidden is not None:
            self._keep_hidden(seq, result.hidden[: n + accepted])
        seq.spec.drafts = []
        self.scheduler.register_computed(seq)
        for token in result.tokens:
            self._emit(seq, token, now)
            if seq.status is Status.FINISHED:
                break
        if seq.status is Status.RUNNING:  # blocks completed by tokens that only now arrived
            self.scheduler.register_computed(seq)
            if result.drafts is not None:  # the step's graph drafted, its MTP module caught up on every position
                seq.spec.mtp_computed, seq.spec.pending_hidden = len(seq) - 1, None
                if self.scheduler.reserve(seq, len(seq) + len(result.drafts)):
                    seq.spec.drafts, seq.spec.draft_probs = result.drafts, None
        return True

    def _emit(self, seq: Sequence, token: int, now: float) -> None:
        if seq.last_token_time is not None:
            self.metrics.itl.append(now - seq.last_token_time)
        else:
            seq.first_token_time = now
            self.metrics.ttft.append(now - seq.arrival)
            self.metrics.prefix_hit_tokens += seq.cached_prompt_tokens
            self.metrics.disk_hit_tokens += seq.disk_hit_tokens
        seq.last_token_time = now
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            raise ValueError(f"token {token} left the request's grammar: {seq.matcher.get_error()}")
        seq.token_ids.append(token)
        if seq.history is not None:
            seq.history.add(token)
        self.metrics.generated_tokens += 1
        params = seq.params
        if (token == self.eos_id and not params.ignore_eos) or token in params.stop_token_ids:
            seq.text.flush()  # the end token's text is not part of the reply
            self.scheduler.finish(seq, "stop")
            return
        seq.text.add(token)
        if seq.text.stopped:
            self.scheduler.finish(seq, "stop")
        elif seq.num_output >= params.max_tokens:
            seq.text.flush()
            if seq.text.stopped:  # the held-back text completed a stop string
                self.scheduler.finish(seq, "stop")
            else:
                self.scheduler.finish(seq, "length")

    def _keep_hidden(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Main-model hidden states the MTP module still has to see (speculative decoding only)."""
        if self.speculative_tokens and draftable(seq.params):
            spec = seq.spec
            spec.pending_hidden = hidden if spec.pending_hidden is None else torch.cat((spec.pending_hidden, hidden))

    def _draft(self, seqs: list[Sequence]) -> None:
        """Draft k tokens for every sequence that is decoding, has its cache room, and samples plainly."""
        k, ready = self.speculative_tokens, []
        for seq in seqs:
            if not draftable(seq.params) or seq.num_computed + 1 != len(seq) or seq.spec.pending_hidden is None:
                continue
            if self.scheduler.reserve(seq, len(seq) + k):
                ready.append(seq)
        if ready:
            self.runner.draft(ready, k)
        for seq in ready:  # a draft that leaves the grammar is cut there: it could never be accepted
            if seq.matcher is not None:
                valid = seq.matcher.validate_tokens(seq.spec.drafts)
                seq.spec.drafts, seq.spec.draft_probs = seq.spec.drafts[:valid], seq.spec.draft_probs[:valid]

    # --- convenience -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Seq[str | list[int]] | str,
        params: SamplingParams | Seq[SamplingParams] | None = None,
        cache_salt: str | bytes | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion together (continuous batching); results in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = params if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp, cache_salt=cache_salt) for p, sp in zip(prompts, plist, strict=True)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            done |= {out.request_id: out for out in self.step() if out.finish_reason is not None}
        return [done[i] for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text as it grows (other requests keep being served in the same steps)."""
        request_id = self.add_request(prompt, params)
        text, sent = self.sequences[request_id].text, 0
        finished = False
        while not finished:
            finished = any(out.request_id == request_id and out.finish_reason for out in self.step())
            ready = len(text.text) if finished else releasable(text.text, text.hold)
            if ready > sent:
                yield text.text[sent:ready]
                sent = ready

    def kv_cache_bytes_per_token(self) -> int:
        return self.spec.bytes_per_token

    def stats(self) -> dict[str, float | list[float]]:
        """A snapshot for dashboards and /metrics: load, cache use, latency, speculation."""
        m, blocks = self.metrics, self.block_manager

        def mean(xs: deque[float]) -> float:
            return sum(xs) / len(xs) if xs else 0.0

        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "cache_use": 1 - blocks.num_free / blocks.num_blocks,
            "cache_bytes_per_token": self.spec.bytes_per_token,
            "prompt_tokens": m.prompt_tokens,
            "generated_tokens": m.generated_tokens,
            "prefix_hit_tokens": m.prefix_hit_tokens,
            "disk_hit_tokens": m.disk_hit_tokens,
            "disk_cache_bytes": self.disk_cache.bytes if self.disk_cache is not None else 0,
            "preemptions": m.preemptions,
            "mean_ttft_s": mean(m.ttft),
            "mean_itl_s": mean(m.itl),
            "tokens_per_step": m.generated_tokens / m.decode_rows if m.decode_rows else 0.0,  # per sequence
            "spec_acceptance": m.acceptance_rate,
            "spec_acceptance_by_position": m.acceptance_by_position,
        }

    def rank_stats(self) -> list[dict]:
        """Per rank of the launch (this engine alone: one) what /metrics labels by rank: requests running and
        finished, cache blocks used, and per MoE layer the (token, rank) units sent to other ranks and received
        from them, with the bytes sent and the tokens through the layer."""
        blocks, m = self.block_manager, self.metrics
        stats = {
            **self.stats(),
            "rank": self.ranks.rank if self.ranks else 0,
            "finished": m.finished,
            "steps": m.steps,
            "blocks_used": blocks.num_blocks - blocks.num_free,
            "drafted_tokens": m.drafted_tokens,
            "accepted_tokens": m.accepted_tokens,
        }
        if self.exchange is not None:
            ex = self.exchange.metrics
            stats |= {"moe_dispatched": list(ex.dispatched), "moe_received": list(ex.received)}
            stats |= {
                "moe_bytes": list(ex.bytes_sent),
                "moe_tokens": list(ex.tokens),
                "moe_replica_pairs": ex.replica_pairs,
            }
        return [stats]
