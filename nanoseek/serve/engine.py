"""The inference engine: scheduler + paged latent cache + absorbed-MLA model runner + sampler.

    engine = nanoseek.Engine("runs/tiny/model")
    [out] = engine.generate(["def fib(n):"], nanoseek.SamplingParams(max_tokens=64, temperature=0))
    for delta in engine.stream("import os\\n", nanoseek.SamplingParams(max_tokens=32)): print(delta, end="")

One `step()` schedules a batch (decodes plus prefill chunks), runs one forward pass over it through the
absorbed MLA (attention reads only cached latents), samples a token for every sequence whose prompt is
done, and retires finished sequences, freeing their blocks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.device import default_device, default_dtype
from nanoseek.model import Transformer
from nanoseek.serve.kv_cache import BlockManager, CacheSpec, LatentPool, StepCache
from nanoseek.serve.sampling import SamplingParams, sample_token
from nanoseek.serve.scheduler import Scheduler, Sequence, Status
from nanoseek.tokenizer import Tokenizer, load_tokenizer


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[tuple[float, dict[int, float] | None]] = field(default_factory=list)

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
    preemptions: int = 0
    ttft: list[float] = field(default_factory=list)  # seconds from arrival to first token
    itl: list[float] = field(default_factory=list)  # seconds between a request's tokens


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
        self.spec = CacheSpec.for_model(cfg, dtype, fp8=fp8_cache)
        num_blocks = max(2, cache_bytes // (self.spec.bytes_per_token * block_size))
        self.block_manager = BlockManager(num_blocks, block_size)
        self.pool = LatentPool(self.spec, num_blocks * block_size, self.device)
        self.scheduler = Scheduler(self.block_manager, max_batched_tokens, max_seqs)
        self.sequences: dict[str, Sequence] = {}
        self.metrics = EngineMetrics()
        self._ids = itertools.count()
        self.eos_id = self.tokenizer.eos_id if self.tokenizer else cfg.eos_token_id

    # --- requests --------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:  # fmt: skip
        params = params or SamplingParams()
        ids = self._encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + params.max_tokens > self.model.cfg.max_position_embeddings:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                             f"{self.model.cfg.max_position_embeddings} positions")  # fmt: skip
        request_id = request_id or f"req-{next(self._ids)}"
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seq = Sequence(request_id, ids, params, generator=generator)
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
                             seq.cached_prompt_tokens, list(seq.logprobs))  # fmt: skip

    # --- one engine step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[str]:
        """Run one batch; returns the ids of the requests that got a new token (or finished)."""
        batch = self.scheduler.schedule()
        self.metrics.preemptions = self.scheduler.preemptions
        if not batch:
            return []
        logits = self._forward(batch)
        now, touched = time.perf_counter(), []
        for row, (seq, n) in enumerate(batch):
            seq.num_computed += n
            self.scheduler.register_computed(seq)
            if seq.num_computed < len(seq.tokens):  # still prefilling
                continue
            sampled = sample_token(logits[row], seq.params, seq.generator, seq.prompt, seq.output)
            if seq.token_times:
                self.metrics.itl.append(now - seq.token_times[-1])
            else:
                self.metrics.ttft.append(now - seq.arrival)
                self.metrics.prefix_hit_tokens += seq.cached_prompt_tokens
            seq.token_times.append(now)
            seq.output.append(sampled.token)
            seq.logprobs.append((sampled.logprob, sampled.top_logprobs))
            self.metrics.generated_tokens += 1
            self._check_finished(seq)
            touched.append(seq.id)
        self.metrics.steps += 1
        return touched

    def _forward(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        bs, device = self.block_manager.block_size, self.device
        t = max(n for _, n in batch)
        lengths = [seq.num_computed + n for seq, n in batch]
        width = max(lengths)
        ids = torch.zeros(len(batch), t, dtype=torch.long)
        positions = torch.zeros(len(batch), t, dtype=torch.long)
        valid = torch.zeros(len(batch), t, dtype=torch.bool)
        slots_of = []
        for row, (seq, n) in enumerate(batch):
            table = torch.tensor(seq.blocks, dtype=torch.long)
            pos = torch.arange(lengths[row])
            slots_of.append(table[pos // bs] * bs + pos % bs)
            ids[row, :n] = torch.tensor(seq.tokens[seq.num_computed : seq.num_computed + n])
            positions[row, :n] = torch.arange(seq.num_computed, seq.num_computed + n)
            valid[row, :n] = True
        read = torch.zeros(len(batch), width, dtype=torch.long)
        write = torch.zeros(len(batch), t, dtype=torch.long)
        for row, ((seq, n), slots) in enumerate(zip(batch, slots_of, strict=True)):
            read[row, : len(slots)] = slots
            write[row, :n] = slots[seq.num_computed :]
        keys = torch.arange(width)
        mask = (keys[None, None, :] <= positions[:, :, None]) & (
            keys[None, None, :] < torch.tensor(lengths)[:, None, None]
        )
        mask[~valid] = keys == 0  # padding queries look at one key: no all-masked rows, no NaN
        cache = StepCache(self.pool, write.to(device), valid.to(device), read.to(device), mask[:, None].to(device))
        last = torch.tensor([n - 1 for _, n in batch], device=device)
        logits, _ = self.model.forward_cached(ids.to(device), positions.to(device), cache, last)
        return logits.float()

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
    def generate(self, prompts: Seq[str | list[int]] | str,
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:  # fmt: skip
        """Run prompts to completion together (continuous batching); results in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = params if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        while any(self.sequences[i].status is not Status.FINISHED for i in ids):
            self.step()
        return [self.output(i) for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text as it grows (other requests keep being served in the same steps)."""
        request_id = self.add_request(prompt, params)
        seq, sent = self.sequences[request_id], 0
        while seq.status is not Status.FINISHED:
            self.step()
            if len(seq.text) > sent:
                yield seq.text[sent:]
                sent = len(seq.text)
        if len(seq.text) > sent:
            yield seq.text[sent:]

    def kv_cache_bytes_per_token(self) -> int:
        return self.spec.bytes_per_token
