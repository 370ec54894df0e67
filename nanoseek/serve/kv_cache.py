"""The paged latent KV cache: a pool of fixed-size blocks, block tables per sequence, prefix sharing.

MLA caches, per token and layer, only the kv_lora_rank latent and the qk_rope_head_dim RoPE key:
(kv_lora_rank + qk_rope_head_dim) x layers x element bytes per token, shared by all heads. The pool
holds num_blocks blocks of block_size token slots, sized from a memory budget. Full blocks are hashed
by (parent block's hash, their token ids), reference counted, and reused by any request with the same
prefix (as vLLM's prefix caching); blocks nobody references stay cached until they are needed, the
least recently used first. A hash chain starts at a root that names the model and the cache namespace
(an API key), so two namespaces never share, or even find, each other's blocks. Behind the memory tier
an optional disk tier (prefix_cache.DiskCache) is asked for the blocks memory lacks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanoseek.config import ModelConfig


class CacheFull(RuntimeError):
    """The paged latent cache has no room: for a request that could never fit, or a block taken from an
    empty free list. nanoseek's own, so that callers never mistake it for the process running out of memory."""


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes())
    return h.digest()


class BlockManager:
    """Which blocks are free, cached or in use; the cache of full blocks by prefix hash."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.on_register: Callable[[bytes, int], None] | None = None  # a block became findable: persist it
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}  # block -> hash, for full blocks
        self.block_of: dict[bytes, int] = {}  # hash -> block
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order: oldest first

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise CacheFull("no free KV-cache block")
        block, _ = self.free.popitem(last=False)  # evict the least recently freed
        if block in self.hash_of:
            del self.block_of[self.hash_of.pop(block)]
        self.ref[block] = 1
        return block

    def match_prefix(
        self, tokens: list[int], root: bytes | None = None, load: Callable[[bytes, int], bool] | None = None
    ) -> tuple[list[int], bytes | None, int]:
        """Take references on the cached full blocks that start `tokens`. Blocks memory lacks are asked of
        `load(hash, block)`, which fills a fresh block from a lower tier. Returns (blocks, last hash, how
        many of them were loaded)."""
        blocks, parent, loaded = [], root, 0
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            digest = block_hash(parent, tokens[start : start + self.block_size])
            block = self.block_of.get(digest)
            if block is not None:
                if self.ref[block] == 0:
                    del self.free[block]
                self.ref[block] += 1
            elif load is not None and self.free:
                block = self.allocate()
                if not load(digest, block):
                    self.release([block])
                    break
                self.block_of[digest], self.hash_of[block] = block, digest
                loaded += 1
            else:
                break
            blocks.append(block)
            parent = digest
        return blocks, parent, loaded

    def register_full(self, block: int, parent: bytes | None, tokens: list[int]) -> bytes:
        """A block just filled: make it findable by its prefix hash."""
        digest = block_hash(parent, tokens)
        if digest not in self.block_of:
            self.block_of[digest] = block
            self.hash_of[block] = digest
            if self.on_register is not None:
                self.on_register(digest, block)
        return digest

    def forget_prefixes(self) -> None:
        """Make every cached block unfindable (after the weights change, their latents are stale)."""
        self.block_of.clear()
        self.hash_of.clear()

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # the prefix's head is evicted last
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None


def _write_slots(pool: torch.Tensor, layer: int, slots: torch.Tensor, values: torch.Tensor) -> None:
    pool[layer].index_copy_(0, slots, values.to(pool.dtype))


# pool[layer, slots] = values, in place: an op opaque to `torch.compile`, so a captured decode step writes its
# few new latents where they go, where a plain index_put on the pool would be functionalised into a copy of
# the whole pool. Declared with torch.library's schema API rather than `custom_op`, whose autograd and
# view-tracking wrappers cost 3x the call (about 30 against 10 us, four times a step on `tiny`).
_LIB = torch.library.Library("nanoseek", "DEF")
_LIB.define("write_slots(Tensor(a!) pool, int layer, Tensor slots, Tensor values) -> ()")
_LIB.impl("write_slots", _write_slots, "CompositeExplicitAutograd")
torch.library.register_fake("nanoseek::write_slots", lambda pool, layer, slots, values: None, lib=_LIB)
write_slots = torch.ops.nanoseek.write_slots


@dataclass(slots=True)
class CacheSpec:
    layers: int
    latent: int  # kv_lora_rank
    rope: int  # qk_rope_head_dim
    dtype: torch.dtype
    fp8: bool = False

    @property
    def bytes_per_token(self) -> int:
        if self.fp8:  # E4M3 latent with one fp32 scale per token, RoPE key in the compute dtype
            return self.layers * (self.latent + 4 + self.rope * torch.finfo(self.dtype).bits // 8)
        return self.layers * (self.latent + self.rope) * torch.finfo(self.dtype).bits // 8

    @classmethod
    def for_model(cls, cfg: ModelConfig, dtype: torch.dtype, fp8: bool = False) -> CacheSpec:
        return cls(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, fp8)


class LatentPool:
    """The tensors: per layer, slots x (latent + rope), or an E4M3 latent with per-token scales."""

    def __init__(self, spec: CacheSpec, num_slots: int, device: torch.device):
        self.spec, self.num_slots = spec, num_slots
        shape = (spec.layers, num_slots)
        if spec.fp8:
            self.latent = torch.zeros(*shape, spec.latent, dtype=torch.float8_e4m3fn, device=device)
            self.scale = torch.ones(*shape, dtype=torch.float32, device=device)
            self.rope = torch.zeros(*shape, spec.rope, dtype=spec.dtype, device=device)
        else:
            self.kv = torch.zeros(*shape, spec.latent + spec.rope, dtype=spec.dtype, device=device)

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor) -> None:
        """slots [M]; latent [M, r], rope [M, d]."""
        if self.spec.fp8:
            scale = latent.float().abs().amax(-1).clamp(min=1e-12) / 448.0
            self.latent[layer, slots] = (latent.float() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
            self.scale[layer, slots] = scale
            self.rope[layer, slots] = rope.to(self.spec.dtype)
        else:
            write_slots(self.kv, layer, slots, torch.cat((latent, rope), -1))

    def block_tensors(self, slots: slice) -> dict[str, torch.Tensor]:
        """Every layer's entries for a range of slots, copied to the CPU (for the disk tier)."""
        names = ("latent", "scale", "rope") if self.spec.fp8 else ("kv",)
        return {name: getattr(self, name)[:, slots].cpu().clone() for name in names}

    def load_block(self, slots: slice, tensors: dict[str, torch.Tensor]) -> bool:
        """Fill slots from block_tensors' output; False (and nothing written) if it does not fit this pool."""
        names = ("latent", "scale", "rope") if self.spec.fp8 else ("kv",)
        targets = {name: getattr(self, name)[:, slots] for name in names}
        if set(tensors) != set(names) or any(
            tensors[n].shape != t.shape or tensors[n].dtype != t.dtype for n, t in targets.items()
        ):
            return False
        for name, target in targets.items():
            target.copy_(tensors[name])
        return True

    def copy_block(self, src: slice, dst: slice) -> None:
        for name in ("latent", "scale", "rope") if self.spec.fp8 else ("kv",):
            tensor = getattr(self, name)
            tensor[:, dst] = tensor[:, src]

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """slots [B, L] -> [B, L, r + d] in the compute dtype."""
        if self.spec.fp8:
            latent = self.latent[layer, slots].float() * self.scale[layer, slots].unsqueeze(-1)
            return torch.cat((latent.to(self.spec.dtype), self.rope[layer, slots]), -1)
        return self.kv[layer, slots]


class StepCache:
    """The LatentCache one batched forward pass sees: where each new token goes, what each row reads."""

    def __init__(
        self,
        pool: LatentPool,
        write_slots: torch.Tensor,
        valid: torch.Tensor | None,
        read_slots: torch.Tensor,
        mask: torch.Tensor,
    ):
        # [B, t] slots, [B, t] real tokens (None: all are, as in a captured decode step whose idle rows
        # write to a scratch slot): checked here once, not per layer.
        self.pool, self.write_slots, self.valid = pool, write_slots, valid
        self.all_valid = valid is None or bool(valid.all())
        self.read_slots, self.mask = read_slots, mask  # [B, L], [B, 1, t, L]

    def store(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        if self.all_valid:  # decoding: every row feeds tokens, no padding to skip
            self.pool.write(layer, self.write_slots.flatten(), latent.flatten(0, 1), k_rope.flatten(0, 1))
        else:
            self.pool.write(layer, self.write_slots[self.valid], latent[self.valid], k_rope[self.valid])

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.read(layer, self.read_slots), self.mask
