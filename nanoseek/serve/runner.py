"""The model runner (nano-vllm's ModelRunner): `execute(plan)` turns a step's plan into its results: the
inputs from the sequences, one forward pass, the logit rows the step needs, the whole batch sampled at once
(grammar masks and penalties applied), drafts verified, prompts scored, and a row whose parameters fail
failing alone. It also drafts with the MTP module.

A decode step (every row feeds one token, or one and its drafts) runs captured unless `enforce_eager`: it is
compiled with `torch.compile`, its context length dynamic, so that one compilation serves every length; on a
CPU its batch size too (a few graphs in all: a batch of one, and one per static MoE path), on CUDA one per
batch bucket (1, 2, 4, ..., padded with idle rows that write to a scratch slot and read only it). A line on
stderr shows each compilation's time. The latent cache is written through an in-place custom op
(kv_cache.write_slots) and the MoE takes a static-shape path while compiling. With one MTP draft per step
(V3's depth) and greedy rows, one graph verifies the drafts and drafts the next (`speculate`); otherwise the
main model's and the MTP module's graphs run in turn, with sampling and verification between them.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field

import torch
from torch._dynamo.utils import counters

from nanoseek.model import Transformer
from nanoseek.model.kernels import FUSED_ROWS
from nanoseek.model.moe import RoutedExperts
from nanoseek.serve.grammar import Grammars
from nanoseek.serve.kv_cache import LatentPool, StepCache
from nanoseek.serve.sampling import Sampled, sample_batch
from nanoseek.serve.scheduler import ScheduledRow
from nanoseek.serve.sequence import Sequence
from nanoseek.serve.speculative import distribution, draft_token, draftable, verify

Row = tuple[Sequence, int, list[int]]  # a sequence, the position of its first fed token, the tokens fed
PromptLogprob = tuple[float, dict[int, float] | None]


@dataclass(slots=True)
class RowResult:
    """What a step gave one scheduled row."""

    hidden: torch.Tensor | None  # [fed, hidden]: the main model's hidden states of the fed tokens
    tokens: list[int] = field(default_factory=list)  # to emit: the sampled token, or the accepted drafts and one
    drafts: list[int] | None = None  # the next step's drafts, when this step's graph drafted them
    sampled: Sampled | None = None  # the sampled token's log-probabilities (rows without drafts)
    prompt_logprobs: list[PromptLogprob] | None = None  # scoring a prompt: for the positions after start..
    error: Exception | None = None  # this row's parameters or state failed; the others went on


def plain(seq: Sequence) -> bool:
    """Greedy with nothing to compute per token but the argmax: no penalties, biases, logprobs or grammar."""
    p = seq.params
    return p.greedy and draftable(p) and seq.matcher is None and p.prompt_logprobs is None


def bucket(batch: int) -> int:
    """The captured graph a decode batch runs in: the next power of two."""
    return 1 << (batch - 1).bit_length()


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        pool: LatentPool,
        block_size: int,
        device: torch.device,
        enforce_eager: bool = True,
        grammars: Grammars | None = None,
        graph_tokens: int = 1,
    ):
        self.model, self.pool, self.block_size, self.device = model, pool, block_size, device
        self.grammars = grammars
        self.scratch_slot = pool.num_slots - 1  # idle rows of a padded batch write here; no block holds it
        self.captured = not enforce_eager and not pool.spec.fp8  # the FP8 cache writes eagerly
        # A CPU graph takes any batch size (no padding, a few compilations); CUDA's take buckets, for CUDA graphs.
        self.dynamic_batch = device.type == "cpu"
        self.graph_tokens = graph_tokens  # the widest row a captured step takes: one token and its drafts
        self._graphs: dict[str, object] = {}

    # --- a step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, plan: list[ScheduledRow]) -> list[RowResult]:
        """One forward pass over the plan; every row's tokens sampled (or drafts verified) and prompt scored."""
        if self._speculates(plan):
            return self._speculate(plan)
        hidden = self.forward([(r.seq, r.start, r.feed) for r in plan])  # [B, t, hidden]
        results = [RowResult(hidden[i, : len(r.feed)]) for i, r in enumerate(plan)]
        # One head matmul over the logits wanted: a sampling row's last fed token's, and each draft's after it.
        wanted = [(i, row.num_new - 1, 1 + len(row.drafts)) for i, row in enumerate(plan) if row.samples]
        logits = self.logits(hidden, [(i, last + j) for i, last, count in wanted for j in range(count)])
        first = itertools.accumulate([count for _, _, count in wanted], initial=0)  # each row's first logits row
        spans = {i: slice(at, at + count) for (i, _, count), at in zip(wanted, first, strict=False)}
        plain = [i for i in spans if not plan[i].drafts]
        sampled = self._sample([plan[i].seq for i in plain], logits[[spans[i].start for i in plain]]) if plain else []
        for i, picked in zip(plain, sampled, strict=True):
            if isinstance(picked, Exception):
                results[i].error = picked
            else:
                results[i].tokens, results[i].sampled = [picked.token], picked
        for i, row in enumerate(plan):
            try:
                if row.drafts and row.samples:
                    results[i].tokens = self._verify(row, logits[spans[i]])
                if row.seq.params.prompt_logprobs is not None and row.start < row.seq.num_prompt:
                    scored = results[i].hidden[: min(row.num_new, row.seq.num_prompt - row.start)]
                    results[i].prompt_logprobs = self._score_prompt(row.seq, row.start, scored)
            except Exception as e:  # one request's parameters or state: it fails alone, the batch goes on
                results[i].error = e
        return results

    def _speculates(self, plan: list[ScheduledRow]) -> bool:
        """Whether one captured graph can verify the step's drafts and draft the next: one draft per row (V3's
        MTP depth), every row decoding greedily with nothing else to compute per token (no penalties, biases,
        logprobs or grammar)."""
        return self.captured and self.graph_tokens == 2 and all(len(r.drafts) == 1 and plain(r.seq) for r in plan)

    def _speculate(self, plan: list[ScheduledRow]) -> list[RowResult]:
        """A greedy speculative step in one graph (as SGLang and vLLM run MTP under CUDA graphs): the main model
        on [last token, draft], its argmax at both, the MTP module over the accepted positions, its argmax."""
        size = len(plan) if self.dynamic_batch else bucket(len(plan))
        ids, positions, cache = self.prepare([(r.seq, r.start, r.feed) for r in plan], pad_to=size, width=2)
        target, accepted, drafts = (t.tolist() for t in self._run_captured("speculate", ids, positions, cache))
        return [RowResult(None, target[i][: accepted[i] + 1], drafts=[drafts[i]]) for i in range(len(plan))]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Sampled | Exception]:
        """The next token of every row of logits [B, V], in one pass (grammar masks and penalties applied)."""
        if any(s.matcher is not None for s in seqs):
            self.grammars.mask_(logits, [s.matcher for s in seqs])
        try:
            return self.sample(logits, seqs)
        except Exception:  # one row's parameters broke the batch: sample row by row, and fail only that row
            picked: list[Sampled | Exception] = []
            for j, seq in enumerate(seqs):
                try:
                    picked += self.sample(logits[[j]], [seq])
                except Exception as e:
                    picked.append(e)
            return picked

    def _verify(self, row: ScheduledRow, logits: torch.Tensor) -> list[int]:
        """The accepted drafts and one token of the main model's, from the logits [k+1, V] at the last fed token
        and each draft."""
        seq = row.seq
        if seq.matcher is not None:  # each position's logits as its grammar state allows
            logits = logits.clone()
            self.grammars.draft_masks_(logits, seq.matcher, row.drafts)
        return verify(logits, row.drafts, seq.spec.draft_probs, seq.params, seq.generator)

    def _score_prompt(self, seq: Sequence, start: int, hidden: torch.Tensor) -> list[PromptLogprob]:
        """The log-probabilities of the prompt tokens after positions start.. (hidden [m, hidden]), each with
        its top alternatives: each position's logits score the next prompt token."""
        nxt = torch.tensor(seq.prompt[start + 1 : start + 1 + hidden.shape[0]], device=hidden.device)
        logprobs = self.model.lm_head(hidden[: len(nxt)]).float().log_softmax(-1)
        chosen = logprobs.gather(-1, nxt[:, None]).squeeze(-1).tolist()
        top = seq.params.prompt_logprobs
        values, ids = logprobs.topk(top, dim=-1) if top else (None, None)
        return [
            (lp, dict(zip(ids[i].tolist(), values[i].tolist(), strict=True)) if top else None)
            for i, lp in enumerate(chosen)
        ]

    # --- inputs ------------------------------------------------------------------------------------
    def prepare(
        self, rows: list[Row], pad_to: int | None = None, width: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, StepCache]:
        """Token ids and positions [B, t] and the StepCache for the rows (and idle rows up to pad_to; t at
        least width)."""
        bs, idle = self.block_size, (pad_to or len(rows)) - len(rows)
        t = max(width or 1, *(len(feed) for _, _, feed in rows))
        # The whole batch in a few tensor ops (a loop over rows cost ~35 us a row: 4.5 ms a step at 128 rows).
        starts = torch.tensor([start for _, start, _ in rows] + [0] * idle)
        fed = torch.tensor([len(feed) for _, _, feed in rows] + [0] * idle)
        ends = starts + fed
        width = int(ends.max())
        blocks = -(-width // bs)  # block-table columns; a shorter row's are padded with block 0, never read
        table = [(seq.blocks[:blocks] + [0] * blocks)[:blocks] for seq, _, _ in rows] + [[0] * blocks] * idle
        table = torch.tensor(table)
        slots = (table[:, :, None] * bs + torch.arange(bs)).flatten(1)[:, :width]  # [n, width]: each position's slot
        keys = torch.arange(width)
        read = torch.where(keys < ends[:, None], slots, self.scratch_slot)  # idle rows read only the scratch slot
        ids = torch.tensor([feed + [0] * (t - len(feed)) for _, _, feed in rows] + [[0] * t] * idle)
        valid = torch.arange(t) < fed[:, None]  # [n, t]
        positions = torch.where(valid, starts[:, None] + torch.arange(t), 0)
        write = torch.where(valid, slots.gather(1, positions), self.scratch_slot)
        mask = (keys <= positions[:, :, None]) & (keys < ends.clamp(min=1)[:, None, None])
        mask[~valid] = keys == 0  # padding queries look at one key: no all-masked rows, no NaN
        valid[len(rows) :] = True  # idle rows write to the scratch slot, and read only it
        to = self.device
        cache = StepCache(self.pool, write.to(to), valid.to(to), read.to(to), mask[:, None].to(to))
        return ids.to(to), positions.to(to), cache

    # --- the forward pass ---------------------------------------------------------------------------
    def forward(self, rows: list[Row], hiddens: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states [B, t, hidden] for the rows: of the main model, or with `hiddens` (each row's main-model
        hidden states, one per token fed) of the MTP module. Captured, unless eager, where every row feeds at
        most `graph_tokens` (a decode step and its drafts); a prefill chunk runs eagerly."""
        t = max(len(feed) for _, _, feed in rows)
        if not self.captured or t > self.graph_tokens:
            ids, positions, cache = self.prepare(rows)
            if hiddens is None:
                return self.model.forward_cached(ids, positions, cache)
            return self.model.mtp_forward_cached(ids, self._stack(hiddens, ids.shape), positions, cache)
        size = len(rows) if self.dynamic_batch else bucket(len(rows))
        # One graph per width: a token, or a token and its drafts (a shorter row is padded, writing to scratch).
        ids, positions, cache = self.prepare(rows, pad_to=size, width=1 if t == 1 else self.graph_tokens)
        if hiddens is None:
            return self._run_captured("decode", ids, positions, cache)[: len(rows)]
        return self._run_captured("draft", ids, positions, cache, self._stack(hiddens, ids.shape))[: len(rows)]

    def _stack(self, hiddens: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
        """The rows' hidden states as one [B, t, hidden] tensor, zero-padded."""
        out = torch.zeros(*shape, self.model.cfg.hidden_size, dtype=hiddens[0].dtype, device=self.device)
        for i, h in enumerate(hiddens):
            out[i, : h.shape[0]] = h
        return out

    @torch.no_grad()
    def capture(self, max_batch: int) -> None:
        """Compile the decode step now for batches up to max_batch (a server pays this at start-up, not in a
        request), on steps of idle rows that write to the scratch slot and read only it. On a CPU the batch is
        dynamic: batch 1 and the largest batch of each of the MoE's static paths cover every graph it needs; on
        CUDA every bucket. With MTP drafts, the widths of a verifying step and the MTP module's graphs too."""
        if not self.captured:
            return
        sizes = [1 << i for i in range(bucket(max_batch).bit_length())]
        widths = sorted({1, self.graph_tokens})
        if self.dynamic_batch:  # each of the MoE's paths, its dynamic graph marked at batches of 2 and more
            experts = [m for m in self.model.modules() if isinstance(m, RoutedExperts)][:1]
            k = self.model.cfg.num_experts_per_tok
            paths = experts[0].captured_paths(k, max_batch, self.device) if experts else set()
            fused = {min(FUSED_ROWS // width, max_batch) for width in widths}  # products of a few rows fused
            sizes = sorted({1, min(2, max_batch), max_batch} | paths | fused)
        hidden = self.model.cfg.hidden_size
        start = time.perf_counter()
        kinds = ["decode", "draft"] if self.graph_tokens > 1 else ["decode"]  # drafting: the MTP module's too
        kinds += ["speculate"] if self.graph_tokens == 2 else []  # one draft: verified and drafted in one graph
        for size, width, kind in itertools.product(sizes, widths, kinds):
            if kind == "speculate" and width == 1:
                continue
            slots = torch.full((size, width + 1), self.scratch_slot, device=self.device)  # + 1: a dynamic length
            ids = torch.zeros(size, width, dtype=torch.long, device=self.device)
            mask = torch.ones(size, 1, width, width + 1, dtype=torch.bool, device=self.device)
            h = torch.zeros(size, width, hidden, dtype=self.pool.kv.dtype, device=self.device)
            cache = StepCache(self.pool, slots[:, :width], None, slots, mask)
            self._run_captured(kind, ids, ids, cache, h if kind == "draft" else None, quiet=True)
        seconds = time.perf_counter() - start
        say(f"decode steps for batches 1-{max_batch} captured in {seconds:.1f} s")

    def _run_captured(
        self,
        kind: str,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: StepCache,
        hidden: torch.Tensor | None = None,
        quiet: bool = False,
    ) -> torch.Tensor:
        torch._dynamo.mark_dynamic(cache.read_slots, 1)  # any context length, one compilation
        torch._dynamo.mark_dynamic(cache.mask, 3)
        inputs = [ids, positions, cache.write_slots, cache.read_slots, cache.mask]
        if self.dynamic_batch and ids.shape[0] > 1:  # (dynamo specialises a batch of 1 anyway)
            for tensor in inputs + ([hidden] if hidden is not None else []):
                # "maybe": the MoE's choice of static path may pin a small batch (tokens x k <= experts)
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        compiled, start = counters["frames"]["ok"], time.perf_counter()
        out = self._graph(kind)(self.pool.kv, *([hidden] if hidden is not None else []), *inputs)
        if counters["frames"]["ok"] != compiled and not quiet:  # a graph compiled at its first step: said once
            seconds = time.perf_counter() - start
            say(f"{kind} step for batch {ids.shape[0]} x {ids.shape[1]} tokens captured in {seconds:.1f} s")
        return out

    def _graph(self, kind: str):
        """The compiled main-model step ("decode"), MTP step ("draft") or greedy speculative step ("speculate").
        The pool is an input, not a constant of the graph, so that the in-place writes reach it as they are."""
        if kind not in self._graphs:
            model, pool = self.model, self.pool

            def decode(kv, ids, positions, write_slots, read_slots, mask):
                return model.forward_cached(ids, positions, StepCache(pool, write_slots, None, read_slots, mask))

            def draft(kv, hidden, ids, positions, write_slots, read_slots, mask):
                cache = StepCache(pool, write_slots, None, read_slots, mask)
                return model.mtp_forward_cached(ids, hidden, positions, cache)

            def speculate(kv, ids, positions, write_slots, read_slots, mask):
                # ids [B, 2]: each row's last token and its draft, at positions p, p + 1.
                cache = StepCache(pool, write_slots, None, read_slots, mask)
                hidden = model.forward_cached(ids, positions, cache)  # [B, 2, hidden]
                target = model.lm_head(hidden).float().argmax(-1)  # [B, 2]: the main model's next tokens
                accepted = (target[:, 0] == ids[:, 1]).long()  # [B]: the draft kept (1) or not (0)
                bonus = target.gather(1, accepted[:, None])  # [B, 1]: the token after the accepted ones
                # MTP at position i reads token i + 1: the draft if kept, else the bonus; then the bonus (a
                # rejected draft's position is garbage, rewritten next step, as the main model's latent there).
                nxt = torch.cat((torch.where(accepted[:, None] == 1, ids[:, 1:], bonus), bonus), 1)
                mtp = model.mtp_forward_cached(nxt, hidden, positions, cache)  # [B, 2, hidden]
                last = mtp.gather(1, accepted[:, None, None].expand(-1, 1, mtp.shape[-1])).squeeze(1)
                return target, accepted, model.lm_head(last).float().argmax(-1)

            limit = torch._dynamo.config.cache_size_limit
            torch._dynamo.config.cache_size_limit = max(limit, 32)  # graphs per batch shape and width
            # On a CPU, Inductor's C++ wrapper calls the kernels without Python between them: 1.3x the tiny
            # preset's batch-1 decode (1101 vs 835 tok/s), whose step is overhead-bound.
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
            fn = {"decode": decode, "draft": draft, "speculate": speculate}[kind]
            self._graphs[kind] = torch.compile(fn, options=options)
        return self._graphs[kind]

    def logits(self, hidden: torch.Tensor, picks: list[tuple[int, int]]) -> torch.Tensor | None:
        """One output-head matmul for the (row, position) pairs whose next token is wanted: [P, V] float32."""
        if not picks:
            return None
        rows, cols = zip(*picks, strict=True)
        return self.model.lm_head(hidden[list(rows), list(cols)]).float()

    # --- sampling and drafting ------------------------------------------------------------------------
    @staticmethod
    def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[Sampled]:
        return sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs], [s.history for s in seqs])

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
            out = self.forward(rows, hiddens)  # [B, t, hidden]
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
