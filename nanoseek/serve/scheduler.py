"""Continuous batching: requests join and leave the running batch at every step.

Each step takes every running sequence's next tokens (one when decoding, a chunk when prefilling) and
then admits waiting requests while the token budget lasts, so long prompts are prefilled in chunks
interleaved with other requests' decoding. A new request first reuses the cached blocks of its longest
matching prefix. When the cache runs out, the most recently admitted sequence is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed later (never a crash).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nanoseek.serve.kv_cache import BlockManager, CacheFull
from nanoseek.serve.sequence import Sequence, Status


@dataclass(slots=True)
class ScheduledRow:
    """One sequence's share of a step: the plan the model runner executes and the engine then applies."""

    seq: Sequence
    start: int  # the position of the first token fed
    num_new: int  # the sequence's own tokens computed now: a prefill chunk, or the one token to decode
    drafts: list[int] = field(default_factory=list)  # MTP drafts fed after them, to be verified

    @property
    def feed(self) -> list[int]:
        return self.seq.token_ids[self.start : self.start + self.num_new] + self.drafts

    @property
    def samples(self) -> bool:
        """Whether the prompt is done after this step, so that the next token is wanted."""
        return self.start + self.num_new >= len(self.seq)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_batched_tokens: int = 512,
        max_seqs: int = 64,
        load_block: Callable[[bytes, int], bool] | None = None,
        copy_block: Callable[[int, int], None] | None = None,
    ):
        self.blocks = blocks
        self.load_block = load_block  # the disk tier, asked for prefix blocks memory lacks
        self.copy_block = copy_block  # copies a block's cache entries (copy-on-write of a shared block)
        self.max_batched_tokens, self.max_seqs = max_batched_tokens, max_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledRow]:
        """This step's plan: every running sequence's next tokens (with its drafts to verify), then waiting
        requests admitted while the token budget lasts."""
        budget, batch = self.max_batched_tokens, []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget <= 0:
                continue
            n = min(len(seq) - seq.num_computed, budget)
            while not self.reserve(seq, seq.num_computed + n):
                # The latest admitted goes; it is never one already batched (running is in admission order).
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                decoding = n == 1 and seq.num_computed + 1 == len(seq)
                batch.append(ScheduledRow(seq, seq.num_computed, n, seq.spec.drafts if decoding else []))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if not seq.blocks and seq.params.prompt_logprobs is None:  # scoring a prompt computes all of it
                self._match_prefix(seq)
            n = min(len(seq) - seq.num_computed, budget)
            if not self.reserve(seq, seq.num_computed + n):
                if not self.running:  # nothing to wait for: this request can never fit
                    raise CacheFull(f"request {seq.id} needs more KV cache than the engine has")
                self._reset(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(ScheduledRow(seq, seq.num_computed, n))
            budget -= n
        return batch

    def _match_prefix(self, seq: Sequence) -> None:
        blocks, last, loaded = self.blocks.match_prefix(seq.token_ids, seq.cache_root, self.load_block)
        size, num_computed = self.blocks.block_size, len(blocks) * self.blocks.block_size
        if blocks and num_computed == len(seq):
            # Every token is cached, but the last one's logits start the generation: it is computed again,
            # into a private copy of its block (shared blocks are never written).
            if self.copy_block is not None and self.blocks.num_free:
                private = self.blocks.allocate()
                self.copy_block(blocks[-1], private)
                self.blocks.release(blocks[-1:])
                blocks[-1] = private
                num_computed -= 1
            else:  # no copy possible: recompute the whole last block
                self.blocks.release(blocks[-1:])
                blocks.pop()
                last = self.blocks.hash_of[blocks[-1]] if blocks else seq.cache_root
                loaded = min(loaded, len(blocks))
                num_computed -= size
        seq.blocks, seq.last_hash, seq.num_hashed = blocks, last, len(blocks)
        seq.num_computed = num_computed
        seq.spec.mtp_computed = seq.num_computed  # the MTP module's latents of a shared prefix are shared too
        if not seq.num_output:  # prefix-cache hits are whole blocks, as billed
            seq.cached_prompt_tokens = len(blocks) * size
            seq.disk_hit_tokens = loaded * size

    def reserve(self, seq: Sequence, upto: int) -> bool:
        needed = -(-upto // self.blocks.block_size) - len(seq.blocks)
        if needed > self.blocks.num_free:
            return False
        seq.blocks += [self.blocks.allocate() for _ in range(max(0, needed))]
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it will be recomputed from its tokens so far."""
        self._reset(seq)
        seq.spec.clear()
        seq.spec.mtp_computed = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _reset(self, seq: Sequence) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_hashed, seq.last_hash = [], 0, 0, seq.cache_root

    def register_computed(self, seq: Sequence) -> None:
        """Make the sequence's newly completed blocks shareable by later requests."""
        size = self.blocks.block_size
        while (seq.num_hashed + 1) * size <= min(seq.num_computed, len(seq)):
            i = seq.num_hashed
            seq.last_hash = self.blocks.register_full(
                seq.blocks[i], seq.last_hash, seq.token_ids[i * size : (i + 1) * size]
            )
            seq.num_hashed += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []
        seq.spec.clear()
        seq.status, seq.finish_reason = Status.FINISHED, reason
