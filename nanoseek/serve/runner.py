"""The model runner (nano-vllm's ModelRunner): a step's inputs from its sequences, one forward pass, the
logit rows the step needs, the whole batch sampled at once, and MTP drafts.

A decode step (every row feeds one token) can run captured (`enforce_eager=False`): the decode pass is
compiled with `torch.compile` once per batch-size bucket (1, 2, 4, ..., padded with idle rows that write
to a scratch slot and read only it), its context length dynamic, so one compilation serves a bucket at
every length; a line on stderr shows each compilation's time. The latent cache is written through an
in-place custom op (kv_cache.write_slots) and the MoE takes a static-shape path while compiling.
"""

from __future__ import annotations

import sys
import time

import torch

from nanoseek.model import Transformer
from nanoseek.serve.kv_cache import LatentPool, StepCache
from nanoseek.serve.sampling import History, Sampled, sample_batch
from nanoseek.serve.sequence import Sequence
from nanoseek.serve.speculative import distribution, draft_token

Row = tuple[Sequence, int, list[int]]  # a sequence, the position of its first fed token, the tokens fed


def bucket(batch: int) -> int:
    """The captured graph a decode batch runs in: the next power of two."""
    return 1 << (batch - 1).bit_length()


class ModelRunner:
    def __init__(
        self, model: Transformer, pool: LatentPool, block_size: int, device: torch.device, enforce_eager: bool = True
    ):
        self.model, self.pool, self.block_size, self.device = model, pool, block_size, device
        self.scratch_slot = pool.num_slots - 1  # idle rows of a padded batch write here; no block holds it
        self.captured = not enforce_eager and not pool.spec.fp8  # the FP8 cache writes eagerly
        self._decode = None
        self._buckets: set[int] = set()

    # --- inputs ------------------------------------------------------------------------------------
    def prepare(self, rows: list[Row], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor, StepCache]:
        """Token ids and positions [B, t] and the StepCache for the rows (and idle rows up to pad_to)."""
        bs, n = self.block_size, pad_to or len(rows)
        t = max(len(feed) for _, _, feed in rows)
        ends = [start + len(feed) for _, start, feed in rows]
        width = max(ends)
        ids = torch.zeros(n, t, dtype=torch.long)
        positions = torch.zeros(n, t, dtype=torch.long)
        valid = torch.zeros(n, t, dtype=torch.bool)
        read = torch.full((n, width), self.scratch_slot, dtype=torch.long)
        write = torch.full((n, t), self.scratch_slot, dtype=torch.long)
        lengths = torch.ones(n, dtype=torch.long)
        for row, ((seq, start, feed), end) in enumerate(zip(rows, ends, strict=True)):
            blocks = torch.tensor(seq.blocks[: -(-end // bs)], dtype=torch.long)
            slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()[:end]  # every position's slot
            ids[row, : len(feed)] = torch.tensor(feed)
            positions[row, : len(feed)] = torch.arange(start, end)
            valid[row, : len(feed)] = True
            read[row, :end] = slots
            write[row, : len(feed)] = slots[start:]
            lengths[row] = end
        keys = torch.arange(width)
        mask = (keys <= positions[:, :, None]) & (keys < lengths[:, None, None])
        mask[~valid] = keys == 0  # padding queries look at one key: no all-masked rows, no NaN
        valid[len(rows) :] = True  # idle rows write to the scratch slot, and read only it
        to = self.device
        cache = StepCache(self.pool, write.to(to), valid.to(to), read.to(to), mask[:, None].to(to))
        return ids.to(to), positions.to(to), cache

    # --- the forward pass ---------------------------------------------------------------------------
    def forward(self, rows: list[Row]) -> torch.Tensor:
        """Hidden states [B, t, hidden] for the rows; a decode step runs captured unless eager."""
        if not self.captured or any(len(feed) != 1 for _, _, feed in rows):
            return self.model.forward_cached(*self.prepare(rows))
        size = bucket(len(rows))
        return self._run_captured(size, *self.prepare(rows, pad_to=size))[: len(rows)]

    @torch.no_grad()
    def capture(self, max_batch: int) -> None:
        """Compile every bucket up to max_batch now (a server pays this at start-up, not in a request):
        each on a step of idle rows that write to the scratch slot and read only it."""
        if not self.captured:
            return
        sizes, start = [1 << i for i in range(bucket(max_batch).bit_length())], time.perf_counter()
        for size in sizes:
            slots = torch.full((size, 2), self.scratch_slot, device=self.device)  # two: a dynamic length
            ids = torch.zeros(size, 1, dtype=torch.long, device=self.device)
            mask = torch.ones(size, 1, 1, 2, dtype=torch.bool, device=self.device)
            self._run_captured(size, ids, ids, StepCache(self.pool, slots[:, :1], None, slots, mask), quiet=True)
        seconds = time.perf_counter() - start
        say(f"decode steps for batches {sizes[0]}-{sizes[-1]} captured in {seconds:.1f} s")

    def _run_captured(
        self, size: int, ids: torch.Tensor, positions: torch.Tensor, cache: StepCache, quiet: bool = False
    ) -> torch.Tensor:
        torch._dynamo.mark_dynamic(cache.read_slots, 1)  # any context length, one compilation
        torch._dynamo.mark_dynamic(cache.mask, 3)
        start = time.perf_counter()
        hidden = self._compiled()(self.pool.kv, ids, positions, cache.write_slots, cache.read_slots, cache.mask)
        if size not in self._buckets:
            self._buckets.add(size)
            if not quiet:  # a bucket compiled at its first step: once, and said once
                say(f"decode step for batch {size} captured in {time.perf_counter() - start:.1f} s")
        return hidden

    def _compiled(self):
        if self._decode is None:
            model, pool = self.model, self.pool

            # The pool is an input (not a constant of the graph), so the in-place writes reach it as they are.
            def decode(kv, ids, positions, write_slots, read_slots, mask):
                return model.forward_cached(ids, positions, StepCache(pool, write_slots, None, read_slots, mask))

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)  # buckets
            self._decode = torch.compile(decode)
        return self._decode

    def logits(self, hidden: torch.Tensor, picks: list[tuple[int, int]]) -> torch.Tensor | None:
        """One output-head matmul for the (row, position) pairs whose next token is wanted: [P, V] float32."""
        if not picks:
            return None
        rows, cols = zip(*picks, strict=True)
        return self.model.lm_head(hidden[list(rows), list(cols)]).float()

    # --- sampling and drafting ------------------------------------------------------------------------
    @staticmethod
    def sample(logits: torch.Tensor, seqs: list[Sequence], histories: list[History | None]) -> list[Sampled]:
        return sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs], histories)

    def draft(self, seqs: list[Sequence], k: int) -> None:
        """Catch the MTP module up on the tokens the main model accepted, then draft k tokens per sequence
        (later drafts chain the module on its own output, as vLLM does with one module)."""
        # MTP at position i reads token i+1 and the main model's hidden state at i.
        rows: list[Row] = [(s, s.spec.mtp_computed, s.token_ids[s.spec.mtp_computed + 1 :]) for s in seqs]
        hiddens = [s.spec.pending_hidden for s in seqs]
        for s in seqs:
            s.spec.mtp_computed, s.spec.pending_hidden = len(s) - 1, None
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for _ in range(k):
            ids, positions, cache = self.prepare(rows)
            h_in = torch.zeros(
                len(rows), ids.shape[1], self.model.cfg.hidden_size, dtype=hiddens[0].dtype, device=self.device
            )
            for i, h in enumerate(hiddens):
                h_in[i, : h.shape[0]] = h
            out = self.model.mtp_forward_cached(ids, h_in, positions, cache)
            last = out[torch.arange(len(rows)), torch.tensor([len(feed) - 1 for _, _, feed in rows])]
            logits = self.model.lm_head(last).float()
            next_rows, next_hidden = [], []
            for i, (seq, start, feed) in enumerate(rows):
                q = distribution(logits[i], seq.params)
                token = draft_token(q, seq.params, seq.generator)
                drafts[i].append(token)
                probs[i].append(q)
                next_rows.append((seq, start + len(feed), [token]))
                next_hidden.append(last[i][None])
            rows, hiddens = next_rows, next_hidden
        for seq, d, q in zip(seqs, drafts, probs, strict=True):
            seq.spec.drafts, seq.spec.draft_probs = d, torch.stack(q)


def say(text: str) -> None:
    print(f"nanoseek: {text}", file=sys.stderr, flush=True)
