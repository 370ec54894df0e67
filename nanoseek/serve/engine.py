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

import hashlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.device import default_device, inference_dtype
from nanoseek.model import Transformer
from nanoseek.serve import parallel
from nanoseek.serve.config import EngineConfig
from nanoseek.serve.grammar import Grammars
from nanoseek.serve.kv_cache import BlockManager, CacheSpec, LatentPool
from nanoseek.serve.output import TextOutput, releasable
from nanoseek.serve.packed import pack_model, packing_available, packing_pays
from nanoseek.serve.prefix_cache import DiskCache
from nanoseek.serve.runner import ModelRunner, Row
from nanoseek.serve.sampling import History, SamplingParams, needs_history
from nanoseek.serve.scheduler import Scheduler
from nanoseek.serve.sequence import Sequence, Status
from nanoseek.serve.speculative import verify
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
    decode_rows: int = 0  # (sequence, step) pairs that produced tokens
    drafted_tokens: int = 0  # speculative decoding: MTP drafts checked ...
    accepted_tokens: int = 0  # ... and kept
    # The latest 10,000 of each: seconds from arrival to first token, and between a request's tokens.
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    itl: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


class Engine:
    def __init__(
        self,
        model: str | Path | Transformer,
        tokenizer: Tokenizer | str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        block_size: int = 16,
        cache_bytes: int = 256 * 2**20,
        max_batched_tokens: int = 512,
        max_seqs: int = 64,
        fp8_cache: bool = False,
        weights: str = "auto",
        model_parallel: bool = False,
        speculative_tokens: int = 0,
        cache_dir: str | Path | None = None,
        disk_cache_bytes: int = 8 * 2**30,
        enforce_eager: bool = True,
        pack_weights: str = "auto",
    ):
        self.device = torch.device(device) if device else default_device()
        # Under torchrun (model_parallel) this is rank 0, and the other ranks hold shares of the routed experts.
        self.ranks = parallel.from_env(self.device) if model_parallel and not isinstance(model, Transformer) else None
        if isinstance(model, Transformer):
            self.model = model.to(self.device)
            model_dir = None
        else:
            from nanoseek.checkpoint import from_pretrained

            model_dir = Path(model)
            hidden = ModelConfig.from_json(model_dir).hidden_size
            if weights in ("bf16", "fp32"):  # the weights' dtype is the compute dtype
                dtype = dtype or {"bf16": torch.bfloat16, "fp32": torch.float32}[weights]
            dtype = dtype or inference_dtype(self.device, hidden)
            if self.ranks is not None:
                if self.ranks.rank != 0:
                    raise ValueError("ranks > 0 of a torchrun launch serve experts: nanoseek.serve.parallel.run_worker")
                parallel.claim()
                dtype = parallel.share_dtype(self.ranks, dtype)
            shard = (0, self.ranks.world) if self.ranks is not None else None
            self.model = from_pretrained(
                model_dir, dtype=dtype, device=self.device, weights=weights, expert_shard=shard
            )
            if self.ranks is not None:
                parallel.attach(self.model, self.ranks)
                enforce_eager = True  # a captured graph cannot hold the per-layer collectives
            if any(getattr(m, "resident_fp8", False) for m in self.model.modules()):
                enforce_eager = True  # captured, FP8 experts would be dequantised all at once each step
        self.model.eval()
        dtype = self.model.embed_tokens.weight.dtype
        if tokenizer is None and model_dir is not None and (model_dir / "tokenizer.json").is_file():
            tokenizer = model_dir
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        cfg = self.model.cfg
        if speculative_tokens and not self.model.mtp:
            raise ValueError("speculative decoding drafts with the MTP module, and this model has none")
        self.speculative_tokens = speculative_tokens
        self.spec = CacheSpec.for_model(cfg, dtype, fp8=fp8_cache)
        if speculative_tokens:  # the MTP block's attention keeps its own latents, as one more layer
            self.spec.layers += 1
        num_blocks = max(2, cache_bytes // (self.spec.bytes_per_token * block_size))
        self.block_manager = BlockManager(num_blocks, block_size)
        self.pool = LatentPool(self.spec, num_blocks * block_size + 1, self.device)  # + the runner's scratch slot
        self.runner = ModelRunner(self.model, self.pool, block_size, self.device, enforce_eager=enforce_eager)
        self.fingerprint = self._fingerprint(model_dir, every_byte=cache_dir is not None)
        # A CPU engine's own weights are packed for oneDNN's decode kernels (serve/packed.py). A model passed in
        # may be training (GRPO's policy): a packed copy would go stale.
        if pack_weights not in ("auto", "on", "off"):
            raise ValueError(f"pack_weights must be auto, on or off, not {pack_weights!r}")
        own = model_dir is not None and self.ranks is None
        wanted = packing_pays(self.model) if pack_weights == "auto" else pack_weights == "on"
        self.packed = wanted and own and packing_available(self.device)
        if self.packed:
            pack_model(self.model)
        self.disk_cache = DiskCache(cache_dir, disk_cache_bytes, self.fingerprint) if cache_dir is not None else None
        if self.disk_cache is not None:
            self.block_manager.on_register = self._persist_block
        load = self._load_block if self.disk_cache is not None else None
        copy = lambda src, dst: self.pool.copy_block(self._block_slots(src), self._block_slots(dst))  # noqa: E731
        self.scheduler = Scheduler(self.block_manager, max_batched_tokens, max_seqs, load_block=load, copy_block=copy)
        self.sequences: dict[str, Sequence] = {}  # the live requests; a finished one leaves with its output
        self._histories: dict[str, History] = {}  # the penalised requests' token counts
        self.metrics = EngineMetrics()
        self._ids = itertools.count()
        self.eos_id = self.tokenizer.eos_id if self.tokenizer else cfg.eos_token_id
        self.grammars = Grammars(self.tokenizer, cfg.vocab_size) if self.tokenizer else None

    @classmethod
    def from_config(cls, cfg: EngineConfig, **kwargs) -> Engine:
        """The engine a command's settings describe (kwargs: the constructor's other arguments)."""
        return cls(
            cfg.model,
            cache_bytes=cfg.cache_memory_mb * 2**20,
            max_batched_tokens=cfg.max_batched_tokens,
            max_seqs=cfg.max_seqs,
            fp8_cache=cfg.fp8_cache,
            weights=cfg.weights,
            speculative_tokens=cfg.speculative_tokens,
            cache_dir=cfg.cache_dir,
            disk_cache_bytes=int(cfg.disk_cache_gb * 2**30),
            enforce_eager=cfg.enforce_eager,
            pack_weights=cfg.pack_weights,
            **kwargs,
        )

    # --- the prefix cache's tiers and namespaces ---------------------------------------------------
    def _fingerprint(self, model_dir: Path | None, every_byte: bool) -> bytes:
        """What a cached latent depends on: the config, the cache layout and the weights. For the disk tier
        (`every_byte`), every weight byte: of the files, hashed once and remembered beside them, or of the
        tensors of a model passed in memory; corrupt or retrained weights in the same folder never read
        the healthy model's files. In memory alone a strided sample of each tensor tells models apart."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self.model.cfg.to_hf_dict(), sort_keys=True, default=str).encode())
        h.update(repr((self.spec, self.block_manager.block_size)).encode())
        if every_byte and model_dir is not None:
            from nanoseek.checkpoint import weights_fingerprint

            h.update(weights_fingerprint(model_dir))
            return h.digest()
        for name, t in sorted(self.model.state_dict().items()):
            flat = t.detach().flatten()
            if not every_byte:
                flat = flat[:: max(1, t.numel() // 256)][:256]
            h.update(name.encode() + repr(tuple(t.shape)).encode())
            h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.digest()

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
        """Finish writing the disk cache (call before the process ends to keep every block); release the
        other ranks of a torchrun launch."""
        if self.disk_cache is not None:
            self.disk_cache.close()
        if self.ranks is not None:
            parallel.stop(self.ranks)
            parallel.leave()
            self.ranks = None

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
                f"({self.block_manager.num_blocks * size} tokens): raise cache_bytes"
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
        )
        if needs_history(params):
            self._histories[request_id] = History(ids, self.model.cfg.vocab_size, self.device)
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
        self._histories.pop(seq.id, None)
        return self._output(seq)

    # --- one engine step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the outputs of the requests that got new tokens or finished (these leave)."""
        batch = self.scheduler.schedule()
        self.metrics.preemptions = self.scheduler.preemptions
        if not batch:
            return []
        rows: list[Row] = []
        for seq, n in batch:
            feed = seq.token_ids[seq.num_computed : seq.num_computed + n]
            drafts = seq.spec.drafts if n == 1 and seq.num_computed + 1 == len(seq) else []
            rows.append((seq, seq.num_computed, feed + drafts))
        hidden = self.runner.forward(rows)  # [B, t, hidden]
        # The logits of a sequence's last fed token and each draft, for sequences whose prompt is done.
        wanted = [
            (row, n - 1, len(feed) - n + 1)
            for row, ((seq, n), (_, start, feed)) in enumerate(zip(batch, rows, strict=True))
            if start + n >= len(seq)
        ]
        logits = self.runner.logits(hidden, [(row, n0 + j) for row, n0, count in wanted for j in range(count)])
        offsets = itertools.accumulate([0] + [count for *_, count in wanted])  # each row's first logits row
        first = dict(zip((row for row, _, _ in wanted), offsets, strict=False))
        sampled = self._sample(batch, wanted, first, logits)
        now, touched = time.perf_counter(), []
        for row, ((seq, n), (_, start, feed)) in enumerate(zip(batch, rows, strict=True)):
            try:
                if self._advance(seq, n, start, feed[n:], hidden[row], logits, first.get(row), sampled.get(row), now):
                    touched.append(seq)
            except Exception as e:  # one request's parameters or state: it fails alone, the batch goes on
                log.exception("request %s failed", seq.id)
                seq.error = f"{type(e).__name__}: {e}"
                self.scheduler.finish(seq, "error")
                touched.append(seq)
        if self.speculative_tokens:
            try:
                self._draft([seq for seq, _ in batch if seq.status is Status.RUNNING])
            except Exception:  # drafts only save time: without them every sequence still decodes correctly
                log.exception("MTP drafting failed; this step goes on without drafts")
        self.metrics.steps += 1
        return [self._retire(seq) if seq.status is Status.FINISHED else self._output(seq) for seq in touched]

    def _sample(self, batch, wanted, first, logits) -> dict[int, object]:
        """The batch's next tokens in one pass, for rows without drafts (drafted rows are verified instead)."""
        rows = [row for row, _, count in wanted if count == 1]
        if not rows:
            return {}
        seqs = [batch[row][0] for row in rows]
        histories = [self._histories.get(s.id) for s in seqs]
        picks = logits[[first[row] for row in rows]]
        if any(s.matcher is not None for s in seqs):
            self.grammars.mask_(picks, [s.matcher for s in seqs])
        try:
            picked = self.runner.sample(picks, seqs, histories)
        except Exception:  # one row's parameters broke the batch: sample row by row, and fail only that row
            picked = []
            for j, (seq, history) in enumerate(zip(seqs, histories, strict=True)):
                try:
                    picked += self.runner.sample(picks[[j]], [seq], [history])
                except Exception as e:
                    picked.append(e)
        return dict(zip(rows, picked, strict=True))

    def _advance(
        self,
        seq: Sequence,
        n: int,
        start: int,
        drafts: list[int],
        hidden: torch.Tensor,
        logits: torch.Tensor | None,
        first: int | None,
        sampled,
        now: float,
    ) -> bool:
        """Take one row's forward-pass results into its sequence; True when it emitted tokens."""
        if seq.params.prompt_logprobs is not None and start < seq.num_prompt:
            self._score_prompt(seq, start, hidden[: min(n, seq.num_prompt - start)])
        if start + n >= len(seq) and seq.params.max_tokens == 0:  # the prompt was only to be scored
            seq.num_computed += n
            self.scheduler.finish(seq, "length")
            return True
        if start + n < len(seq):  # a prefill chunk: nothing to sample yet
            seq.num_computed += n
            self._keep_hidden(seq, hidden[:n])
            self.scheduler.register_computed(seq)
            return False
        if drafts:
            scored, probs = logits[first : first + 1 + len(drafts)], seq.spec.draft_probs
            if seq.matcher is not None:  # each position's logits as its grammar state allows
                scored = scored.clone()
                self.grammars.draft_masks_(scored, seq.matcher, drafts)
            emitted = verify(scored, drafts, probs, seq.params, seq.generator)
            self.metrics.drafted_tokens += len(drafts)
            self.metrics.accepted_tokens += len(emitted) - 1
        else:
            if isinstance(sampled, Exception):
                raise sampled
            emitted = [sampled.token]
            if seq.params.logprobs is not None:
                seq.logprobs.append((sampled.logprob, sampled.top_logprobs))
        self.metrics.decode_rows += 1
        seq.num_computed = start + n + len(emitted) - 1  # the fed token and the accepted drafts
        self._keep_hidden(seq, hidden[: n + len(emitted) - 1])
        seq.spec.drafts = []
        self.scheduler.register_computed(seq)
        for token in emitted:
            self._emit(seq, token, now)
            if seq.status is Status.FINISHED:
                break
        if seq.status is Status.RUNNING:  # blocks completed by tokens that only now arrived
            self.scheduler.register_computed(seq)
        return True

    def _score_prompt(self, seq: Sequence, start: int, hidden: torch.Tensor) -> None:
        """The log-probabilities of the prompt tokens after positions start.. (hidden [m, hidden]): each
        position's logits score the next prompt token."""
        if start == 0:  # (again, after a preemption: a recomputed prompt is scored again)
            seq.prompt_logprobs = [None]
        del seq.prompt_logprobs[start + 1 :]
        nxt = torch.tensor(seq.prompt[start + 1 : start + 1 + hidden.shape[0]], device=hidden.device)
        logprobs = self.model.lm_head(hidden[: len(nxt)]).float().log_softmax(-1)
        chosen = logprobs.gather(-1, nxt[:, None]).squeeze(-1).tolist()
        top = seq.params.prompt_logprobs
        values, ids = logprobs.topk(top, dim=-1) if top else (None, None)
        for i, lp in enumerate(chosen):
            alternatives = dict(zip(ids[i].tolist(), values[i].tolist(), strict=True)) if top else None
            seq.prompt_logprobs.append((lp, alternatives))

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
        if seq.id in self._histories:
            self._histories[seq.id].add(token)
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

    def _draftable(self, seq: Sequence) -> bool:
        p = seq.params  # penalties, biases and logprobs need the full sampler on every token: no drafts
        return not needs_history(p) and p.logprobs is None and not p.logit_bias

    def _keep_hidden(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Main-model hidden states the MTP module still has to see (speculative decoding only)."""
        if self.speculative_tokens and self._draftable(seq):
            spec = seq.spec
            spec.pending_hidden = hidden if spec.pending_hidden is None else torch.cat((spec.pending_hidden, hidden))

    def _draft(self, seqs: list[Sequence]) -> None:
        """Draft k tokens for every sequence that is decoding, has its cache room, and samples plainly."""
        k, ready = self.speculative_tokens, []
        for seq in seqs:
            if not self._draftable(seq) or seq.num_computed + 1 != len(seq) or seq.spec.pending_hidden is None:
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

    def stats(self) -> dict[str, float]:
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
        }
