"""The inference engine: scheduler + paged latent cache + absorbed-MLA model runner + sampler.

    engine = nanoseek.Engine("runs/tiny/model")
    [out] = engine.generate(["def fib(n):"], nanoseek.SamplingParams(max_tokens=64, temperature=0))
    for delta in engine.stream("import os\\n", nanoseek.SamplingParams(max_tokens=32)): print(delta, end="")

With `cache_dir`, full prefix blocks also go to disk (prefix_cache.DiskCache) and are found there by later
requests and later processes with the same model; `add_request(..., cache_salt=key)` keeps each key's
prefixes apart. One `step()` schedules a batch (decodes plus prefill chunks), runs one forward pass over it through the
absorbed MLA (attention reads only cached latents), samples a token for every sequence whose prompt is
done, and retires finished sequences, freeing their blocks.
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

from nanoseek.device import default_device, default_dtype
from nanoseek.model import Transformer
from nanoseek.serve.kv_cache import BlockManager, CacheSpec, LatentPool, StepCache
from nanoseek.serve.prefix_cache import DiskCache
from nanoseek.serve.sampling import SamplingParams, sample_token
from nanoseek.serve.scheduler import Scheduler, Sequence, Status
from nanoseek.serve.speculative import distribution, draft_token, verify
from nanoseek.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("nanoseek.serve")


def releasable(text: str, hold: int) -> int:
    """How much of a growing text can be streamed: the last `hold` characters wait, since a stop string
    (of hold + 1 characters at most) may still be forming, and so does a half-decoded character."""
    return len(text.rstrip("\ufffd")) - hold


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
        speculative_tokens: int = 0,
        cache_dir: str | Path | None = None,
        disk_cache_bytes: int = 8 * 2**30,
    ):
        self.device = torch.device(device) if device else default_device()
        dtype = dtype or default_dtype(self.device)
        if isinstance(model, Transformer):
            self.model = model.to(self.device)
            model_dir = None
        else:
            from nanoseek.checkpoint import from_pretrained

            model_dir = Path(model)
            self.model = from_pretrained(model_dir, dtype=dtype, device=self.device)
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
        self.pool = LatentPool(self.spec, num_blocks * block_size, self.device)
        self.fingerprint = self._fingerprint(model_dir, every_byte=cache_dir is not None)
        self.disk_cache = DiskCache(cache_dir, disk_cache_bytes, self.fingerprint) if cache_dir is not None else None
        if self.disk_cache is not None:
            self.block_manager.on_register = self._persist_block
        load = self._load_block if self.disk_cache is not None else None
        copy = lambda src, dst: self.pool.copy_block(self._block_slots(src), self._block_slots(dst))  # noqa: E731
        self.scheduler = Scheduler(self.block_manager, max_batched_tokens, max_seqs, load_block=load, copy_block=copy)
        self.sequences: dict[str, Sequence] = {}
        self.metrics = EngineMetrics()
        self._ids = itertools.count()
        self.eos_id = self.tokenizer.eos_id if self.tokenizer else cfg.eos_token_id

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
        """Finish writing the disk cache (call before the process ends to keep every block)."""
        if self.disk_cache is not None:
            self.disk_cache.close()

    # --- requests --------------------------------------------------------------------------------
    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, with the numbers, if a request can never run; reads only fixed state."""
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + params.max_tokens > self.model.cfg.max_position_embeddings:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                             f"{self.model.cfg.max_position_embeddings} positions")  # fmt: skip
        if min(ids) < 0 or max(ids) >= self.model.cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.model.cfg.vocab_size})")
        size = self.block_manager.block_size
        if -(-(len(ids) + params.max_tokens + self.speculative_tokens) // size) > self.block_manager.num_blocks:
            raise ValueError(f"prompt + max_tokens needs more KV cache than this engine holds "
                             f"({self.block_manager.num_blocks * size} tokens): raise cache_bytes")  # fmt: skip

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | bytes | None = None) -> str:  # fmt: skip
        params = params or SamplingParams()
        ids = self._encode(prompt)
        self.check_request(ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seq = Sequence(request_id, ids, params, generator=generator, cache_root=self.cache_root(cache_salt))
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        self.metrics.prompt_tokens += len(ids)
        return request_id

    def cancel(self, request_id: str) -> None:
        """Stop a request now; its cache blocks are freed at once."""
        seq = self.sequences.get(request_id)
        if seq is not None:
            self.scheduler.finish(seq, "cancelled")

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids, or a tokenizer")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def output(self, request_id: str) -> RequestOutput:
        seq = self.sequences[request_id]
        return RequestOutput(seq.id, seq.prompt, list(seq.output), seq.text, seq.finish_reason,
                             seq.cached_prompt_tokens, list(seq.logprobs), seq.error)  # fmt: skip

    # --- one engine step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[str]:
        """Run one batch; returns the ids of the requests that got new tokens (or finished)."""
        batch = self.scheduler.schedule()
        self.metrics.preemptions = self.scheduler.preemptions
        if not batch:
            return []
        rows = []
        for seq, n in batch:
            feed = seq.tokens[seq.num_computed : seq.num_computed + n]
            drafts = seq.drafts if n == 1 and seq.num_computed + 1 == len(seq.tokens) else []
            rows.append((seq, seq.num_computed, feed + drafts))
        hidden = self.model.forward_cached(*self._step_inputs(rows))  # [B, t, hidden]
        # One output-head matmul for every position whose logits are needed: a sequence's last fed
        # token and each draft, for sequences whose prompt is done.
        wanted = [  # (row, first position, how many)
            (row, n - 1, len(feed) - n + 1)
            for row, ((seq, n), (_, start, feed)) in enumerate(zip(batch, rows, strict=True))
            if start + n >= len(seq.tokens)
        ]
        picks = [(row, n0 + j) for row, n0, count in wanted for j in range(count)]
        all_logits = self.model.lm_head(hidden[[r for r, _ in picks], [c for _, c in picks]]).float() if picks else None
        greedy = self._greedy_tokens(batch, wanted, all_logits)
        first = dict(
            zip((row for row, _, _ in wanted), itertools.accumulate([0] + [c for *_, c in wanted]), strict=False)
        )
        now, touched = time.perf_counter(), []
        for row, ((seq, n), (_, start, feed)) in enumerate(zip(batch, rows, strict=True)):
            try:
                if self._advance(seq, n, start, feed[n:], hidden[row], all_logits, first.get(row), greedy.get(row),
                                 now):  # fmt: skip
                    touched.append(seq.id)
            except Exception as e:  # one request's parameters or state: it fails alone, the batch goes on
                log.exception("request %s failed", seq.id)
                seq.error = f"{type(e).__name__}: {e}"
                self.scheduler.finish(seq, "error")
                touched.append(seq.id)
        if self.speculative_tokens:
            try:
                self._draft([seq for seq, _ in batch if seq.status is Status.RUNNING])
            except Exception:  # drafts only save time: without them every sequence still decodes correctly
                log.exception("MTP drafting failed; this step goes on without drafts")
        self.metrics.steps += 1
        return touched

    def _advance(self, seq: Sequence, n: int, start: int, drafts: list[int], hidden: torch.Tensor,
                 all_logits: torch.Tensor | None, first: int | None, greedy: int | None,
                 now: float) -> bool:  # fmt: skip
        """Take one row's forward-pass results into its sequence; True when it emitted tokens."""
        if start + n < len(seq.tokens):  # a prefill chunk: nothing to sample yet
            seq.num_computed += n
            self._keep_hidden(seq, hidden[:n])
            self.scheduler.register_computed(seq)
            return False
        logits = all_logits[first : first + 1 + len(drafts)]  # [1 + drafts, V]
        if greedy is not None:
            emitted = [greedy]
        elif drafts:
            emitted = verify(logits, drafts, seq.draft_probs, seq.params, seq.generator)
            self.metrics.drafted_tokens += len(drafts)
            self.metrics.accepted_tokens += len(emitted) - 1
        else:
            sampled = sample_token(logits[0], seq.params, seq.generator, seq.prompt, seq.output)
            emitted = [sampled.token]
            seq.logprobs.append((sampled.logprob, sampled.top_logprobs))
        self.metrics.decode_rows += 1
        seq.num_computed = start + n + len(emitted) - 1  # the fed token and the accepted drafts
        self._keep_hidden(seq, hidden[: n + len(emitted) - 1])
        seq.drafts = []
        self.scheduler.register_computed(seq)
        for token in emitted:
            self._emit(seq, token, now)
            if seq.status is Status.FINISHED:
                break
        if seq.status is Status.RUNNING:  # blocks completed by tokens that only now arrived
            self.scheduler.register_computed(seq)
        return True

    def _greedy_tokens(self, batch, wanted, all_logits) -> dict[int, int]:
        """Rows that need nothing but an argmax (greedy, no penalties, no logprobs, no drafts): one batched
        argmax instead of the per-request sampler."""
        rows, starts, offset = [], [], 0
        for row, _, count in wanted:
            p = batch[row][0].params
            plain = p.repetition_penalty == 1 and not (p.presence_penalty or p.frequency_penalty)
            plain = plain and p.logprobs is None
            if count == 1 and p.greedy and plain:
                rows.append(row)
                starts.append(offset)
            offset += count
        if not rows:
            return {}
        return dict(zip(rows, all_logits[starts].argmax(-1).tolist(), strict=True))

    def _emit(self, seq: Sequence, token: int, now: float) -> None:
        if seq.token_times:
            self.metrics.itl.append(now - seq.token_times[-1])
        else:
            self.metrics.ttft.append(now - seq.arrival)
            self.metrics.prefix_hit_tokens += seq.cached_prompt_tokens
            self.metrics.disk_hit_tokens += seq.disk_hit_tokens
        seq.token_times.append(now)
        seq.output.append(token)
        self.metrics.generated_tokens += 1
        self._check_finished(seq)

    def _draftable(self, seq: Sequence) -> bool:
        p = seq.params  # penalties and logprobs need the full sampler on every token: no drafts
        plain = not (p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty)
        return plain and p.logprobs is None

    def _keep_hidden(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Main-model hidden states the MTP module still has to see (speculative decoding only)."""
        if self.speculative_tokens and self._draftable(seq):
            seq.pending_hidden = hidden if seq.pending_hidden is None else torch.cat((seq.pending_hidden, hidden))

    def _draft(self, seqs: list[Sequence]) -> None:
        """Catch the MTP module up on the tokens the main model accepted, then draft k tokens per sequence."""
        k = self.speculative_tokens
        ready = []
        for seq in seqs:
            if not self._draftable(seq) or seq.num_computed + 1 != len(seq.tokens) or seq.pending_hidden is None:
                continue
            if self.scheduler.reserve(seq, len(seq.tokens) + k):
                ready.append(seq)
        if not ready:
            return
        # MTP at position i reads token i+1 and the main model's hidden state at i.
        rows = [(seq, seq.mtp_computed, seq.tokens[seq.mtp_computed + 1 :]) for seq in ready]
        hiddens = [seq.pending_hidden for seq in ready]
        for seq in ready:
            seq.mtp_computed, seq.pending_hidden = len(seq.tokens) - 1, None
        drafts: list[list[int]] = [[] for _ in ready]
        probs: list[list[torch.Tensor]] = [[] for _ in ready]
        for _ in range(k):  # later drafts chain the module on its own output (as vLLM does with one module)
            ids, positions, cache = self._step_inputs(rows)
            width = ids.shape[1]
            h_in = torch.zeros(len(rows), width, self.model.cfg.hidden_size, dtype=hiddens[0].dtype, device=self.device)
            for i, h in enumerate(hiddens):
                h_in[i, : h.shape[0]] = h
            out = self.model.mtp_forward_cached(ids, h_in, positions, cache)
            next_rows, next_hidden = [], []
            for i, (seq, start, feed) in enumerate(rows):
                last = out[i, len(feed) - 1]
                q = distribution(self.model.lm_head(last).float(), seq.params)
                token = draft_token(q, seq.params, seq.generator)
                drafts[i].append(token)
                probs[i].append(q)
                next_rows.append((seq, start + len(feed), [token]))
                next_hidden.append(last[None])
            rows, hiddens = next_rows, next_hidden
        for seq, d, q in zip(ready, drafts, probs, strict=True):
            seq.drafts, seq.draft_probs = d, torch.stack(q)

    def _step_inputs(self, rows: list[tuple[Sequence, int, list[int]]]):
        """Token ids, positions [B, t] and the StepCache for rows of (sequence, first position, tokens)."""
        bs = self.block_manager.block_size
        t = max(len(feed) for _, _, feed in rows)
        ends = [start + len(feed) for _, start, feed in rows]
        width = max(ends)
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        positions = torch.zeros(len(rows), t, dtype=torch.long)
        valid = torch.zeros(len(rows), t, dtype=torch.bool)
        read = torch.zeros(len(rows), width, dtype=torch.long)
        write = torch.zeros(len(rows), t, dtype=torch.long)
        for row, ((seq, start, feed), end) in enumerate(zip(rows, ends, strict=True)):
            pos = torch.arange(end)
            slots = torch.tensor(seq.blocks, dtype=torch.long)[pos // bs] * bs + pos % bs
            ids[row, : len(feed)] = torch.tensor(feed)
            positions[row, : len(feed)] = torch.arange(start, end)
            valid[row, : len(feed)] = True
            read[row, :end] = slots
            write[row, : len(feed)] = slots[start:]
        keys = torch.arange(width)
        mask = (keys <= positions[:, :, None]) & (keys < torch.tensor(ends)[:, None, None])
        mask[~valid] = keys == 0  # padding queries look at one key: no all-masked rows, no NaN
        device = self.device
        cache = StepCache(self.pool, write.to(device), valid.to(device), read.to(device), mask[:, None].to(device))
        return ids.to(device), positions.to(device), cache

    def _check_finished(self, seq: Sequence) -> None:
        params, token = seq.params, seq.output[-1]
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output, skip_special_tokens=True)
        reason = None
        if (token == self.eos_id and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
            seq.text = self.tokenizer.decode(seq.output[:-1], skip_special_tokens=True) if self.tokenizer else ""
        elif params.stop and any(s in seq.text for s in params.stop):
            reason = "stop"
            cut = min(seq.text.find(s) for s in params.stop if s in seq.text)
            seq.text = seq.text[:cut]
        elif len(seq.output) >= params.max_tokens:
            reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)

    # --- convenience -----------------------------------------------------------------------------
    def generate(self, prompts: Seq[str | list[int]] | str, params: SamplingParams | Seq[SamplingParams] | None = None,
                 cache_salt: str | bytes | None = None) -> list[RequestOutput]:  # fmt: skip
        """Run prompts to completion together (continuous batching); results in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = params if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp, cache_salt=cache_salt) for p, sp in zip(prompts, plist, strict=True)]
        while any(self.sequences[i].status is not Status.FINISHED for i in ids):
            self.step()
        return [self.output(i) for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text as it grows (other requests keep being served in the same steps)."""
        request_id = self.add_request(prompt, params)
        seq, sent = self.sequences[request_id], 0
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        while seq.status is not Status.FINISHED:
            self.step()
            ready = releasable(seq.text, hold)
            if seq.status is not Status.FINISHED and ready > sent:
                yield seq.text[sent:ready]
                sent = ready
        if len(seq.text) > sent:
            yield seq.text[sent:]

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
