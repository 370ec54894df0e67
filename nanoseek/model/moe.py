"""DeepSeekMoE (V3 paper Sec. 2.1.2): shared experts plus fine-grained routed SwiGLU experts.

The gate scores each token against every routed expert with a sigmoid (softmax for V2-style configs).
Selection adds `e_score_correction_bias`, the auxiliary-loss-free balancing bias (V3 Sec. 2.1.2,
eq. 16), and is group-limited: a group scores the sum of its top-2 experts, only the best topk_group
groups stay eligible. The chosen experts are weighted by their *unbiased* scores, normalised over the
top-k when norm_topk_prob is set, and scaled by routed_scaling_factor.

Routed experts run as one grouped computation over tokens sorted by expert: torch._grouped_mm on CUDA,
elsewhere one autograd node that runs a matmul per expert over its contiguous rows (no padding).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.fp8 import (
    dequantize_tiles,
    fake_quantize_blocks,
    fake_quantize_group_tiles,
    fake_quantize_tiles,
    quantize_tiles,
)
from nanoseek.model.expert_parallel import ExpertGroup, dispatch
from nanoseek.model.kernels import linear
from nanoseek.model.layers import MLP, compute_dtype


def route(logits: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick experts for each token. logits [N, E] (fp32) -> (weights [N, k] fp32, indices [N, k])."""
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias  # the bias steers selection only
    n_tokens, n_experts = choice.shape
    if cfg.topk_group < cfg.n_group:
        grouped = choice.view(n_tokens, cfg.n_group, n_experts // cfg.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
        keep = group_scores.topk(cfg.topk_group, dim=-1).indices
        group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).view(n_tokens, n_experts)
    indices = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, indices)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices


def _use_grouped_mm(x: torch.Tensor) -> bool:
    # torch._grouped_mm's backward is CUDA-only (on CPU it fails for fp32 and for empty groups).
    return hasattr(torch, "_grouped_mm") and x.is_cuda and compute_dtype(x) == torch.bfloat16


class _GroupedMM(torch.autograd.Function):
    """Grouped matmul as one matmul per group over its contiguous rows: no padding to the largest group
    (a padded bmm did twice the work at the load imbalance of early training) and no row shuffles. The
    loop runs once per expert, in one autograd node; the groups' sizes are on the host already.

    With fp8, every operand is E4M3 with DeepSeek-V3's fine-grained scales (see nanoseek.fp8): tokens in
    1x128 tiles, expert weights in 128x128 blocks, Wgrad re-quantized in 128x1 tiles along each group's
    tokens; the input is saved in FP8. This is the emulation (FP8 values, FP32 products) on every device."""

    @staticmethod
    def forward(ctx, x, weight, sizes, fp8):
        # Custom functions bypass autocast: cast to its dtype here; backward then runs in it too, and
        # autograd casts the gradients back to the inputs' dtypes.
        dtype = compute_dtype(x)
        x, weight = x.to(dtype), weight.to(dtype)
        ctx.fp8, ctx.sizes = fp8, sizes
        if fp8:
            xq, xs = quantize_tiles(x)
            ctx.save_for_backward(xq, xs, weight)
            x, weight = dequantize_tiles(xq, xs, x.shape[1]).to(x.dtype), fake_quantize_blocks(weight).to(x.dtype)
        else:
            ctx.save_for_backward(x, weight)
        out = x.new_empty(x.shape[0], weight.shape[1])
        for rows, w, o in zip(x.split(sizes), weight, out.split(sizes), strict=True):
            torch.mm(rows, w.t(), out=o)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.fp8:
            xq, xs, weight = ctx.saved_tensors
            x = dequantize_tiles(xq, xs, weight.shape[2]).to(weight.dtype)
        else:
            x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g, w = grad, weight
            if ctx.fp8:  # Dgrad: gradient tiles along `out`, the same weight blocks
                g, w = fake_quantize_tiles(g).to(g.dtype), fake_quantize_blocks(w).to(g.dtype)
            grad_x = torch.empty_like(x)
            for g_rows, w_group, o in zip(g.split(ctx.sizes), w, grad_x.split(ctx.sizes), strict=True):
                torch.mm(g_rows, w_group, out=o)
        if ctx.needs_input_grad[1]:
            g, rows = grad, x
            if ctx.fp8:  # Wgrad contracts over tokens: 128x1 tiles along each expert's tokens
                g = fake_quantize_group_tiles(g, ctx.sizes).to(grad.dtype)
                rows = fake_quantize_group_tiles(rows, ctx.sizes).to(grad.dtype)
            grad_w = torch.empty_like(weight)
            for g_rows, x_rows, o in zip(g.split(ctx.sizes), rows.split(ctx.sizes), grad_w, strict=True):
                torch.mm(g_rows.t(), x_rows, out=o)  # [out, in]
        return grad_x, grad_w, None, None


def grouped_mm(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, fp8: bool = False, sizes: list[int] | None = None
) -> torch.Tensor:
    """Rows of x [M, in], sorted by group, times their group's weight [G, out, in]^T -> [M, out].

    counts [G] says how many consecutive rows belong to each group (sum = M); sizes is counts.tolist(),
    passed in when several matmuls share it (one host sync, not one per matmul)."""
    if _use_grouped_mm(x) and not fp8:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))
    return _GroupedMM.apply(x, weight, counts.tolist() if sizes is None else sizes, fp8)


# A captured CPU step's routed experts take the gathered path at every batch (RoutedExperts._gathered_pays);
# read while a graph is traced, so benchmarks/bench_captured.py compiles both ways side by side.
GATHERED_ON_CPU = True


class Gate(nn.Module):
    """Router weights plus the balancing bias; the bias is a buffer, so no optimizer ever touches it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        bias = torch.zeros(cfg.n_routed_experts, dtype=torch.float32) if cfg.scoring_func == "sigmoid" else None
        self.register_buffer("e_score_correction_bias", bias)

    def _apply(self, fn, recurse=True):
        # Keep the bias in fp32 through model.to(bf16): its 1e-3 updates would vanish in bf16.
        super()._apply(fn, recurse)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k] fp32, indices [N, k], logits [N, E] fp32)."""
        # Routing in fp32, also under bf16 autocast; entered only then, as a graph that enters autocast cannot be
        # cached on disk by AOTAutograd (a later start of the server would trace the decode step again).
        amp = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if amp else contextlib.nullcontext():
            logits = F.linear(x.float(), self.weight.float())
        weights, indices = route(logits, self.e_score_correction_bias, self.cfg)
        return weights, indices, logits


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked, so that all of them run as two grouped matmuls.

    Under expert parallelism (`shard`), this rank holds only its E / P experts and exchanges tokens
    with the other ranks of its EP group (nanoseek.model.expert_parallel)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # per expert [gate_proj; up_proj]
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.fp8 = False  # set by nanoseek.fp8.convert_to_fp8
        # Inference weights kept quantised: "fp8" (E4M3, 128x128 block scales: make_fp8_resident) or "int8" (a
        # scale per row: make_int8_resident), dequantised at use, only the experts chosen.
        self.quantized: str | None = None
        self.ep: ExpertGroup | None = None
        # Serving on a torchrun launch (nanoseek.serve.parallel): this rank holds experts [first_expert, +n_experts);
        # `remote` (serve/exchange.py) sends each call's tokens to the ranks that hold their experts.
        self.first_expert = 0
        self.slot_of: torch.Tensor | None = None  # global expert -> stacked slot, once it holds redundant copies
        self.remote = None
        self.packed = False  # each expert's matrices registered with packed copies (kernels.register_packed)

    def keep_experts(self, first: int, count: int) -> None:
        """Hold only experts [first, first + count) (call it on the meta device, before loading)."""
        for name in ("gate_up_proj", "down_proj"):
            old = getattr(self, name)
            setattr(
                self,
                name,
                nn.Parameter(
                    torch.empty(count, *old.shape[1:], dtype=old.dtype, device=old.device), requires_grad=False
                ),
            )
        self.first_expert, self.n_experts = first, count

    def make_fp8_resident(self) -> None:
        """Keep the experts as DeepSeek-V3's FP8 checkpoints do: E4M3 with one fp32 scale per 128x128 block
        of each expert's gate, up and down projection (gate and up blocks stacked: [E, 2 x I/128, H/128])."""
        e, two_i, h = self.gate_up_proj.shape
        device, blocks = self.gate_up_proj.device, lambda n: -(-n // 128)
        del self.gate_up_proj, self.down_proj
        self.register_buffer("gate_up_proj", torch.empty(e, two_i, h, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("down_proj", torch.empty(e, h, two_i // 2, dtype=torch.float8_e4m3fn, device=device))
        gate_up = torch.empty(e, 2 * blocks(two_i // 2), blocks(h), device=device)
        self.register_buffer("gate_up_proj_scale_inv", gate_up)
        self.register_buffer("down_proj_scale_inv", torch.empty(e, blocks(h), blocks(two_i // 2), device=device))
        self.quantized = "fp8"

    @torch.no_grad()
    def make_int8_resident(self) -> int:
        """Quantise the loaded experts to int8 with an fp32 scale per row (nanoseek.model.int8_weights); returns
        how many matrices."""
        from nanoseek.model.int8_weights import quantize_rows

        for name in ("gate_up_proj", "down_proj"):
            q, scale = quantize_rows(getattr(self, name))
            delattr(self, name)
            self.register_buffer(name, q)
            self.register_buffer(name + "_scale", scale)
        self.quantized = "int8"
        return 2 * self.gate_up_proj.shape[0]

    def expert_weights(self, experts, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate_up and down weights of `experts` (an index, indices or a slice) in `dtype`: views of the
        stacked parameters, or their quantised values dequantised now (only the experts asked for)."""
        if self.quantized is None:
            return self.gate_up_proj[experts], self.down_proj[experts]
        if self.quantized == "int8":
            from nanoseek.model.int8_weights import dequantize_rows

            gate_up = dequantize_rows(self.gate_up_proj[experts], self.gate_up_proj_scale[experts])
            return gate_up.to(dtype), dequantize_rows(self.down_proj[experts], self.down_proj_scale[experts]).to(dtype)
        from nanoseek.fp8 import dequantize_blocks

        w, s = self.gate_up_proj[experts], self.gate_up_proj_scale_inv[experts]
        i, half = w.shape[-2] // 2, s.shape[-2] // 2
        gate = dequantize_blocks(w[..., :i, :], s[..., :half, :])
        up = dequantize_blocks(w[..., i:, :], s[..., half:, :])
        down = dequantize_blocks(self.down_proj[experts], self.down_proj_scale_inv[experts])
        return torch.cat((gate, up), dim=-2).to(dtype), down.to(dtype)

    @torch.no_grad()
    def shard(self, ep: ExpertGroup) -> None:
        """Keep only this rank's experts: [rank * E/P, (rank + 1) * E/P)."""
        if self.n_experts % ep.size:
            raise ValueError(f"--ep {ep.size} must divide n_routed_experts ({self.n_experts})")
        for name in ("gate_up_proj", "down_proj"):
            local = getattr(self, name).chunk(ep.size)[ep.rank].clone()
            setattr(self, name, nn.Parameter(local))
        self.ep = ep

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, hidden], weights/indices [N, k] -> sum over the k chosen experts, [N, hidden]."""
        n, k = indices.shape
        if self.remote is not None:
            return self.remote(self, x, weights, indices)
        if self.ep is None and not self.fp8 and not torch.is_grad_enabled():
            if torch.compiler.is_compiling():  # a captured step: static shapes, no sorting tokens by expert
                # (Quantised experts: few pairs dequantise only the chosen ones, inside the products; more pairs
                # dequantise each expert once, a bounded temporary where gathering would hold one per pair)
                if self._gathered_pays(n * k, x.device):
                    return self._gathered(x, weights, indices)
                return self._every_expert(x, weights, indices)
            if self._few_tokens_pay(n * k) or self.quantized or self.packed:
                return self._few_tokens(x, weights, indices)  # quantised: dequantise only the chosen experts
        flat = indices.flatten()  # [N * k]
        order = flat.argsort(stable=True)  # sort (token, slot) pairs by expert
        counts = torch.bincount(flat, minlength=self.n_experts)
        rows = x.index_select(0, order // k)
        if self.ep is not None:  # to the ranks that own the experts, and (below) back
            rows, counts, combine = dispatch(rows, counts, self.ep)
        sizes = None if _use_grouped_mm(x) and not self.fp8 else counts.tolist()
        h = grouped_mm(rows, self.gate_up_proj, counts, self.fp8, sizes)
        gate, up = h.chunk(2, dim=-1)
        out = grouped_mm(F.silu(gate) * up, self.down_proj, counts, self.fp8, sizes)  # [N * k, hidden], sorted
        if self.ep is not None:
            out = combine(out)
        out = out.index_select(0, order.argsort()).view(n, k, -1)  # back to (token, slot) order
        return torch.bmm(weights.unsqueeze(1).to(out.dtype), out).squeeze(1)  # weighted sum over the k

    def _few_tokens_pay(self, pairs: int) -> bool:
        """A loop over the chosen experts beats sorting tokens by expert while there are fewer (token, expert)
        pairs than experts: a decode step of a few sequences (as DeepSeek's inference code loops). With packed
        weights (nanoseek.model.kernels) the loop runs at every batch: only it reads the packed copies."""
        return pairs <= self.n_experts

    def _gathered_pays(self, pairs: int, device: torch.device) -> bool:
        """In a captured step on a CPU, each (token, expert) pair's products as one fused reduction over its
        expert's rows beat every expert on every token (benchmarks/bench_captured.py) and sorting the pairs
        by expert around an opaque op (since removed) at every batch measured, greedy tokens equal: `small`
        fp32 b8 1.47x, b32 1.41x, b128 1.05x; `tiny` b32 1.42x, b256 1.26x; `small` int8 b8 2.4x, b32 1.39x;
        bf16 level. Not FP8-resident experts, whose per-pair conversion has no vector instruction on such a
        CPU (b32 0.37x), nor CUDA (unmeasured): there, only while pairs are fewer than experts."""
        return self._always_gathered(device) or self._few_tokens_pay(pairs)

    def _always_gathered(self, device: torch.device) -> bool:
        return GATHERED_ON_CPU and device.type == "cpu" and self.quantized != "fp8"

    def captured_paths(self, k: int, max_batch: int, device: torch.device) -> set[int]:
        """The largest batch (up to max_batch) on each of a captured step's paths, so that warming the step
        at these sizes compiles every graph a batch of decoding tokens can need."""
        if self._always_gathered(device):
            return {max_batch}
        return {min(self.n_experts // k, max_batch), max_batch} - {0}

    def _few_tokens(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Decoding a handful of tokens: each chosen expert's weights are read where they lie (copying them out,
        about 44 MB per token on the `small` preset, cost more than the matmuls), for the tokens that chose it."""
        return self.local_sum(x, weights, indices).to(x.dtype)

    def local_sum(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The weighted sum, in fp32, of the experts this module holds over the tokens that chose them (all
        of them on one process; under model-parallel inference, this rank's share)."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # the k experts summed in fp32, rounded once
        tokens = torch.arange(indices.shape[0], device=indices.device).repeat_interleave(indices.shape[1])
        slots = self.local_slots(indices.flatten())
        for slot in slots[slots >= 0].unique().tolist():
            picked = slots == slot
            rows = tokens[picked]  # the tokens that chose this expert (each at most once)
            gate_up, down = self.expert_weights(slot, x.dtype)
            gate, up = linear(x[rows], gate_up).chunk(2, dim=-1)  # on a packed copy of the weights, if any
            h = linear(F.silu(gate) * up, down)  # [rows, hidden]
            out.index_add_(0, rows, h.float() * weights.flatten()[picked].unsqueeze(-1).float())
        return out

    def local_slots(self, experts: torch.Tensor) -> torch.Tensor:
        """Where global expert ids lie in this module's stacked weights: its own [first_expert, + n_experts),
        then any redundant copies of other ranks' experts (add_replica); -1 where not held (ids < 0 included)."""
        if self.slot_of is None:
            held = (experts >= self.first_expert) & (experts < self.first_expert + self.n_experts)
            return torch.where(held, experts - self.first_expert, -1)
        return torch.where(experts >= 0, self.slot_of.to(experts.device)[experts.clamp(min=0)], -1)

    def expert_tensors(self) -> list[str]:
        """The names of the per-expert stacked tensors (dim 0: the expert), scales included."""
        names = ["gate_up_proj", "down_proj"]
        suffix = {"fp8": "_scale_inv", "int8": "_scale"}.get(self.quantized or "")
        return names + [n + suffix for n in names] if suffix else names

    @torch.no_grad()
    def add_replica(self, expert: int, tensors: list[torch.Tensor], n_global: int) -> None:
        """Hold a redundant copy of another rank's expert (serving's EPLB): its tensors, in expert_tensors()
        order, appended after this module's own experts."""
        if self.slot_of is None:
            self.slot_of = torch.full((n_global,), -1, dtype=torch.long)
            self.slot_of[self.first_expert : self.first_expert + self.n_experts] = torch.arange(self.n_experts)
        self.slot_of[expert] = self.gate_up_proj.shape[0]
        for name, tensor in zip(self.expert_tensors(), tensors, strict=True):
            old = getattr(self, name)
            grown = torch.cat((old, tensor.unsqueeze(0).to(old.device)))
            if isinstance(old, nn.Parameter):
                setattr(self, name, nn.Parameter(grown, requires_grad=False))
            else:
                setattr(self, name, grown)

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The loop above, static in shape for a captured graph (whose loops cannot depend on data): each
        (token, expert) pair's products as multiply-and-sum over the chosen expert's rows, which Inductor
        compiles into one reduction that reads the weights where they lie (from the cache, for the pairs of
        an expert chosen more than once). (As a batched matmul, the pairs' weights were first gathered into
        a copy: 44 MB written and read again per token on `small`.)"""
        n, k = indices.shape
        rows = x.repeat_interleave(k, dim=0)  # [N * k, hidden]
        gate_up, down = self.expert_weights(indices.flatten(), x.dtype)  # indexed, fused into the products
        gate, up = (gate_up * rows[:, None, :]).sum(-1).chunk(2, dim=-1)  # [N * k, i] each
        out = (down * (F.silu(gate) * up)[:, None, :]).sum(-1)  # [N * k, hidden]
        return (weights.reshape(-1, 1).float() * out.float()).view(n, k, -1).sum(1).to(x.dtype)

    def _every_expert(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """A captured step with more (token, expert) pairs than experts: every expert runs on every token,
        each expert's weights read once as grouped_mm would, and the unchosen ones weigh zero. E / k times
        the arithmetic of routing, which a batch of decoding tokens leaves the CPU time for."""
        dense = torch.zeros(x.shape[0], self.n_experts, dtype=torch.float32, device=x.device)
        dense.scatter_(1, indices, weights.float())  # [N, E]
        # (A product per expert on its packed copy, 2E opaque calls, measured 0.69x this at batch 8.)
        rows = x.unsqueeze(0).expand(self.n_experts, -1, -1)  # [E, N, hidden]
        gate_up, down = self.expert_weights(slice(None), x.dtype)
        gate, up = torch.bmm(rows, gate_up.transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, down.transpose(1, 2))  # [E, N, hidden]
        return torch.einsum("ne,enh->nh", dense, out.float()).to(x.dtype)


def sequence_balance_loss(logits: torch.Tensor, indices: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """V3's complementary sequence-wise balance loss (Sec. 2.1.2, eq. 17-20), before alpha.

    logits [B, T, E] (fp32), indices [B, T, K]: sum_i f_i P_i per sequence, averaged over sequences,
    with f_i = E / (K T) * (tokens routed to i) and P_i the mean normalised affinity of expert i.
    """
    b, t, e = logits.shape
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
    routed = torch.zeros(b, e, device=logits.device).scatter_add_(
        1, indices.flatten(1), torch.ones(b, indices[0].numel(), device=logits.device)
    )
    f = routed * e / (cfg.num_experts_per_tok * t)
    return (f * p).sum(dim=-1).mean()


V3_BIAS_GAMMA = 1e-3  # V3's bias update speed, over ~250k steps (14.3T tokens; then 0 for the last 500B)
BIAS_TRAVEL = 1.25  # how far a bias must be able to move over a run: beyond the sigmoid scores' spread
MAX_BIAS_GAMMA = 0.005  # faster, a step's sign flips swing the routing more than they correct it


def bias_gamma_for(steps: int, init: str | None = None) -> float:
    """The bias update speed for a run of `steps`: V3's 1e-3, raised for short runs from scratch to
    BIAS_TRAVEL / steps (at most 0.005), so that an expert that starts hot can be cooled within the run.
    Measured on the tiny speedrun (250 steps, benchmarks/bench_balancing.py): at 1e-3 two experts stay hot to
    the end (max/mean load 1.86 in one layer), val loss 2.814; at 0.005 every layer ends at <= 1.16, val loss
    2.820; at 0.01, <= 1.20 and 2.829 (docs/balancing.png). A fine-tune (`init`, a model folder) keeps V3's
    rate: its routing is learnt, and moving it faster undoes that (the speedrun's SFT: held-out pass@1 0.32 at
    1.25 / 350 steps against 0.60 at 1e-3, from the same pretrained model)."""
    if init:
        return V3_BIAS_GAMMA
    return min(MAX_BIAS_GAMMA, max(V3_BIAS_GAMMA, BIAS_TRAVEL / steps))


@torch.no_grad()
def update_balancing_bias(gate: Gate, load: torch.Tensor, gamma: float) -> None:
    """Auxiliary-loss-free balancing (V3 Sec. 2.1.2): after each step, b_i += gamma * sign(mean load - load_i),
    so overloaded experts become less attractive to the router and idle ones more."""
    if gate.e_score_correction_bias is None:  # softmax (V2-style) gates have no bias
        return
    load = load.float()
    gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)


class BalancingHook:
    """The bias update as an optimizer step hook (torchtitan's `register_moe_load_balancing_hook`): the trainer
    hands over the step's global expert loads (`loads`, by MoE layer name) and each optimizer step, once it has
    run, moves the gates' biases by them. The loads are spent: a step without new ones moves nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer, gates: dict[str, Gate], gamma: float):
        self.gates, self.gamma = gates, gamma
        self.loads: dict[str, torch.Tensor] = {}
        optimizer.register_step_post_hook(self.after_step)

    def after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for name, gate in self.gates.items():
            load = self.loads.get(name)
            if load is not None and load.sum() > 0:
                update_balancing_bias(gate, load, self.gamma)
        self.loads = {}


class MoE(nn.Module):
    """Shared plus routed experts. In training mode each forward leaves `expert_load` (tokens per expert,
    detached, for the bias update) and `balance_loss` (differentiable) for the trainer to collect."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.expert_load: torch.Tensor | None = None
        self.balance_loss: torch.Tensor | None = None
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, hidden]
        weights, indices, logits = self.gate(x)
        if self.training:
            self.expert_load = torch.bincount(indices.flatten(), minlength=self.cfg.n_routed_experts).detach()
            if len(shape) == 3:
                self.balance_loss = sequence_balance_loss(
                    logits.view(*shape[:2], -1), indices.view(*shape[:2], -1), self.cfg
                )
        y = self.experts(x, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)
