"""Pipeline parallelism on torch.distributed.pipelining: the decoder layers split into stages over the pp
ranks of each data-parallel replica, micro-batches driven through them by one of PyTorch's schedules.

    torchrun --nproc-per-node 2 -m nanoseek train --preset tiny --pp 2                        # DualPipeV
    torchrun --nproc-per-node 2 -m nanoseek train --preset tiny --pp 2 --pp-schedule 1f1b
    torchrun --nproc-per-node 4 -m nanoseek train --preset tiny --pp 2 --ep 2                 # PP x (FSDP2 + EP)

DeepSeek-V3 trained with 16-way pipeline parallelism on DualPipe (V3 paper Sec. 3.2.1), which overlaps a
micro-batch's forward with another's backward; `ScheduleDualPipeV` is its V-shaped form (each rank holds
stages r and 2P-1-r, so the first and last stages share a rank). Stage 0 embeds the tokens, the last stage
holds the final norm, the output head and the MTP modules; the token embeddings that the MTP modules
need travel down the pipeline as a second activation beside the hidden state (the embedding weight stays
on stage 0 alone). Each stage is a `StageModule` over the very modules of the full `Transformer`, under
their own names, and the rank's `Transformer` is pruned to what its stages hold: checkpoints keep the
one-process names, so any layout resumes any other.

The step equals one process's: token losses summed and divided by the step's trained tokens (the
schedules run with scale_grads=False); each stage's MoE balance loss, scaled as `Trainer.compute_loss`
scales it, reaches backward through `_AttachAux`, an identity on the stage's output whose backward also
gives the balance loss its gradient of 1; expert loads sum over micro-batches and replicas.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from itertools import accumulate, pairwise
from math import inf
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from nanoseek.config import ModelConfig
from nanoseek.cost import layer_params
from nanoseek.model import Transformer
from nanoseek.model.layers import compute_dtype
from nanoseek.model.loss import linear_cross_entropy
from nanoseek.model.moe import MoE
from nanoseek.train import parallel
from nanoseek.train.config import RecipeConfig, TrainConfig


@dataclass(frozen=True, slots=True)
class ScheduleKind:
    cls: type
    stages_per_rank: int
    placement: str  # "loop": stage s on rank s mod P; "v": rank r holds stages r and 2P-1-r
    summary: str


SCHEDULES: dict[str, ScheduleKind] = {
    "dualpipev": ScheduleKind(ScheduleDualPipeV, 2, "v", "DualPipe in its V shape, forward and backward overlapped"),
    "zbv": ScheduleKind(ScheduleZBVZeroBubble, 2, "v", "zero bubble, V-shaped, weight gradients fill the bubble"),
    "interleaved1f1b": ScheduleKind(ScheduleInterleaved1F1B, 2, "loop", "1F1B over 2 round-robin stages per rank"),
    "1f1b": ScheduleKind(Schedule1F1B, 1, "loop", "one forward, one backward"),
    "gpipe": ScheduleKind(ScheduleGPipe, 1, "loop", "all forwards, then all backwards"),
}


KEPT_SCHEDULES = 4  # schedules kept for recent sequence lengths (each holds receive buffers)


# --- the plan: stages, their layers and ranks, micro-batches (pure, no processes) ----------------------
@dataclass(frozen=True, slots=True)
class StageSpec:
    index: int
    rank: int  # within the pipeline (the pp index)
    layers: range
    first: bool
    last: bool


@dataclass(frozen=True, slots=True)
class Layout:
    schedule: str
    pp: int
    stages: tuple[StageSpec, ...]
    microbatches: int
    microbatch_size: int
    mtp_depths: int

    def held(self, pp_rank: int) -> list[StageSpec]:
        return [s for s in self.stages if s.rank == pp_rank]

    def rank_of(self, stage: int) -> int:
        return self.stages[stage].rank

    def ideal_bubble(self) -> float | None:
        """The bubble's share of a step in theory, with equal stage times: (P-1)/(m+P-1) for 1F1B and GPipe,
        (P-1)/(v m + P-1) interleaved over v stages per rank (Narayanan et al. 2021); none in closed form for
        the zero-bubble schedules, whose bubble depends on the F, B and W times."""
        if self.schedule in ("zbv", "dualpipev"):
            return None
        v = SCHEDULES[self.schedule].stages_per_rank
        return (self.pp - 1) / (v * self.microbatches + self.pp - 1)

    def describe(self) -> str:
        kind = SCHEDULES[self.schedule]
        lines = [
            f"pipeline: {self.schedule} ({kind.summary}), {len(self.stages)} stages on {self.pp} ranks, "
            f"{self.microbatches} micro-batches of {self.microbatch_size} sequences per replica"
        ]
        for s in self.stages:
            parts = ["embedding"] if s.first else []
            if len(s.layers) == 1:
                parts.append(f"layer {s.layers.start}")
            elif s.layers:
                parts.append(f"layers {s.layers.start}-{s.layers.stop - 1}")
            if s.last:
                parts.append("norm + head" + (f" + {self.mtp_depths} MTP" if self.mtp_depths else ""))
            lines.append(f"  stage {s.index} on pp rank {s.rank}: {', '.join(parts)}")
        ideal = self.ideal_bubble()
        if ideal is not None:
            lines.append(f"  ideal bubble fraction {ideal:.3f}")
        return "\n".join(lines)


def stage_rank(stage: int, pp: int, placement: str) -> int:
    if placement == "v":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def block_costs(cfg: ModelConfig, seq_len: int, depths: int) -> tuple[list[float], float]:
    """Forward FLOPs per token of each decoder layer (its activated weights and attention at seq_len), and of
    what the last stage adds: the output head and each trained MTP module with its own pass through the head.
    On `tiny` a head (4096 x 128) costs about 3 decoder layers."""
    attention = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len  # 2 x H x d x seq / 2
    layers = [2 * layer_params(cfg, i)[1] + attention for i in range(cfg.num_hidden_layers)]
    head = 2 * cfg.vocab_size * cfg.hidden_size
    mtp = 2 * (layer_params(cfg, cfg.num_hidden_layers)[1] + 2 * cfg.hidden_size**2) + attention + head
    return layers, head + depths * mtp


def split_layers(costs: list[float], n_stages: int, last_extra: float) -> list[range] | None:
    """Contiguous runs of layers, one per stage, that make the busiest stage as light as can be (the last
    stage also pays last_extra); every stage but the last holds at least one layer. None if the layers are
    too few. A small dynamic programme over (stages, layers)."""
    n = len(costs)
    if n < n_stages - 1:
        return None
    prefix = [0.0, *accumulate(costs)]
    # best[s][i]: the lightest busiest stage with layers [0, i) on stages [0, s), each non-empty; cut: its start
    best = [[inf] * (n + 1) for _ in range(n_stages)]
    cut = [[0] * (n + 1) for _ in range(n_stages)]
    best[0][0] = 0.0
    for s in range(1, n_stages):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                load = max(best[s - 1][j], prefix[i] - prefix[j])
                if load < best[s][i]:
                    best[s][i], cut[s][i] = load, j
    # The last stage: layers [j, n), possibly none, plus its head and MTP modules.
    start = min(
        range(n_stages - 1, n + 1), key=lambda j: (max(best[n_stages - 1][j], prefix[n] - prefix[j] + last_extra), -j)
    )
    bounds = [start, n]
    for s in range(n_stages - 1, 0, -1):
        bounds.insert(0, cut[s][bounds[0]])
    return [range(a, b) for a, b in pairwise(bounds)]


def default_microbatches(local_batch: int, n_stages: int) -> int:
    """Two micro-batches per stage, or the next count that divides the batch, or one row each."""
    fits = [m for m in range(2 * n_stages, local_batch + 1) if local_batch % m == 0]
    return fits[0] if fits else local_batch


def plan(cfg: RecipeConfig, model_cfg: ModelConfig, replicas: int, mtp_depths: int) -> Layout:
    """Where each stage runs and which layers it holds; refuses (ValueError) a layout that cannot run."""
    kind = SCHEDULES[cfg.pp_schedule]
    n_stages = cfg.pp * kind.stages_per_rank
    costs, last_extra = block_costs(model_cfg, cfg.seq_len, mtp_depths)
    layers = split_layers(costs, n_stages, last_extra)
    if layers is None:
        raise ValueError(
            f"--pp {cfg.pp} with --pp-schedule {cfg.pp_schedule} makes {n_stages} stages, more than the model's "
            f"{model_cfg.num_hidden_layers} decoder layers can fill: use fewer stages or a 1-stage-per-rank schedule"
        )
    local = cfg.batch_size // replicas
    microbatches = local // cfg.micro_batch_size if cfg.micro_batch_size else default_microbatches(local, n_stages)
    if cfg.pp_schedule != "gpipe" and microbatches < n_stages:
        raise ValueError(
            f"--pp-schedule {cfg.pp_schedule} needs at least one micro-batch per stage ({n_stages}); each replica "
            f"has {local} rows in {microbatches} micro-batches: raise --batch-size or lower --micro-batch-size"
        )
    stages = tuple(
        StageSpec(i, stage_rank(i, cfg.pp, kind.placement), layers[i], i == 0, i == n_stages - 1)
        for i in range(n_stages)
    )
    return Layout(cfg.pp_schedule, cfg.pp, stages, microbatches, local // microbatches, mtp_depths)


def check_supported(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """Refuse at start what the pipeline does not do (rather than fail mid-run)."""
    if cfg.compile:
        raise ValueError("--pp with --compile is not supported (the split-backward schedules refuse compiled stages)")
    if cfg.kl_weight > 0:
        raise ValueError(
            "--pp with --kl-weight (logit distillation) is not supported: the KL term needs the whole logits "
            "on the last stage; distil on the teacher's traces alone, or drop --pp"
        )
    if model_cfg.tie_word_embeddings:
        raise ValueError("--pp needs untied embeddings: a tied head would live on the first and the last stage")


# --- one stage ------------------------------------------------------------------------------------
class _AttachAux(torch.autograd.Function):
    """Identity on a stage's output whose backward also hands `aux` (the stage's balance loss) a gradient of
    1: the loss term reaches backward on its own stage as if added to the final loss."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux = (aux.dtype, aux.device)
        return out.clone()  # not a view of `out`: the pipeline detaches its outputs in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.aux
        return grad, torch.ones((), dtype=dtype, device=device)


class StageModule(nn.Module):
    """One stage: a run of decoder layers, the embedding on the first stage, the final norm, the head and
    the MTP modules on the last. Its submodules are the full model's, under the same names.

    forward: the first stage takes token ids [b, T], the others (hidden [b, T, H], embeddings [b, T, H]);
    a middle stage returns that pair (the embeddings only while MTP trains), the last stage the summed token
    losses [1 + depths] against `targets` (the same as Transformer.forward with targets), or in evaluation
    (mtp=False) [main head, main head against `text_targets`]."""

    def __init__(
        self,
        model: Transformer,
        spec: StageSpec,
        depths: int,
        balance: tuple[float, int],
        autocast: Callable[[], AbstractContextManager],
    ):
        """balance: (alpha, micro-batches), the balance loss's scale; autocast: the trainer's context."""
        super().__init__()
        self.spec, self.depths, self.balance_scale, self.autocast = spec, depths, balance, autocast
        if spec.first:
            self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in spec.layers})
        if spec.last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
        self.rotary_emb = model.rotary_emb
        self.moe: list[tuple[str, MoE]] = [
            (name.removesuffix(".mlp"), m) for name, m in self.named_modules() if isinstance(m, MoE)
        ]
        self.begin_step()

    def blocks(self) -> list[nn.Module]:
        """What FSDP wraps one by one (as parallel.apply does for the whole model)."""
        return [*self.layers.values(), *(self.mtp if self.spec.last else ())]

    def begin_step(self) -> None:
        """Zero what a training step's micro-batches add up: expert loads and the summed balance losses."""
        self.loads = {name: torch.zeros(m.cfg.n_routed_experts) for name, m in self.moe}
        self.balance = torch.zeros(())

    def forward(
        self,
        x: torch.Tensor,
        embeds: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        text_targets: torch.Tensor | None = None,
        mtp: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        carry = mtp and self.depths > 0
        for _, moe in self.moe:
            moe.expert_load = moe.balance_loss = None
        with self.autocast():
            if self.spec.first:
                embeds = self.embed_tokens(x)
                x = embeds
            t = x.shape[1]
            cos, sin = self.rotary_emb(torch.arange(t, device=x.device), x.dtype)
            h = x
            for layer in self.layers.values():
                h = layer(h, cos, sin)
            if self.spec.last:
                out = self._losses(h, embeds, cos, sin, targets, text_targets, carry)
            else:  # a fresh tensor for the embeddings: a stage output must not be its input
                out = (h, embeds.clone()) if carry else (h,)
        aux = self._balance()
        if aux is None:
            return out
        if isinstance(out, tuple):
            return (_AttachAux.apply(out[0], aux), *out[1:])
        return _AttachAux.apply(out, aux)

    def _losses(self, h, embeds, cos, sin, targets, text_targets, carry: bool) -> torch.Tensor:
        """Transformer.forward's tail with targets: the final norm, the head, then each MTP depth."""
        t = h.shape[1]
        h = self.norm(h)
        sums = [self._head(h, targets)]
        if not carry:  # evaluation: the loss of the text tokens too (bits per byte)
            sums.append(sums[0] if text_targets is None else self._head(h, text_targets))
            return torch.stack(sums)
        for k, module in enumerate(self.mtp[: self.depths], start=1):
            # Depth k at position i sees token i+k and depth k-1's hidden state at i: T-k positions.
            h = module(embeds[:, k:], h[:, :-1], cos[: t - k], sin[: t - k])
            sums.append(self._head(h, targets[:, k:]))
        return torch.stack(sums)

    def _head(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), compute_dtype(h))

    def _balance(self) -> torch.Tensor | None:
        """Collect this forward's expert loads and balance losses (MoE leaves them in training mode only);
        the balance term to attach, scaled as Trainer.compute_loss scales it: alpha * sum / micro-batches."""
        losses = [m.balance_loss for _, m in self.moe if m.balance_loss is not None]
        for name, m in self.moe:
            if m.expert_load is not None:
                self.loads[name] = self.loads[name].to(m.expert_load.device) + m.expert_load.float()
        if not losses:
            return None
        bal = torch.stack(losses).sum()
        self.balance = self.balance.to(bal.device) + bal.detach().float()
        alpha, chunks = self.balance_scale
        return alpha * bal / chunks


class TimedStage(PipelineStage):
    """A PipelineStage that adds up its own compute seconds (forward, backward, weight backward): a step's
    wall time less these is the time the rank waited, the pipeline bubble."""

    seconds = 0.0

    def _timed(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - start

    def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(super().forward_one_chunk, *args, **kwargs)

    def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(super().backward_one_chunk, *args, **kwargs)

    def backward_weight_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(super().backward_weight_one_chunk, *args, **kwargs)


# --- the rank's pipeline ------------------------------------------------------------------------------
def prune(model: Transformer, held: list[StageSpec]) -> None:
    """Keep only what this rank's stages hold, under the same names (layers.{i}, mtp.{k}, ...)."""
    keep = sorted(i for s in held for i in s.layers)
    model.layers = nn.ModuleDict({str(i): model.layers[i] for i in keep})
    if not any(s.first for s in held):
        del model.embed_tokens
    if not any(s.last for s in held):
        del model.norm, model.lm_head
        model.mtp = nn.ModuleList()


class Pipeline:
    """This rank's stages of the pipeline and the schedule that runs them; the Trainer calls `step`,
    `eval_sums`, `full_state` and `load_full_state` in place of its one-process code."""

    def __init__(
        self,
        model: Transformer,
        par: parallel.Parallel,
        cfg: RecipeConfig,
        device: torch.device,
        depths: int,
        autocast: Callable[[], AbstractContextManager],
        param_dtype: torch.dtype | None = None,
    ):
        self.par, self.device, self.depths, self.mtp_lambda = par, device, depths, cfg.mtp_lambda
        self.layout = plan(cfg, model.cfg, par.replicas, depths)
        self.full_names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        self.hidden, self.act_dtype = model.cfg.hidden_size, param_dtype or torch.float32
        held = self.layout.held(par.pp_rank)
        balance = (cfg.balance_alpha, self.layout.microbatches)
        self.modules = [StageModule(model, spec, depths, balance, autocast) for spec in held]
        prune(model, held)
        for module in self.modules:
            parallel.apply(module, par, param_dtype, blocks=module.blocks(), reshard_after_forward=False)
        self._schedules: OrderedDict[int, tuple[list[TimedStage], Any]] = OrderedDict()
        self.schedule(cfg.seq_len)  # now: a schedule that refuses these micro-batches says so at start
        self.holds_first = any(s.first for s in held)
        self.holds_last = any(s.last for s in held)
        self._counts = torch.ones(1 + depths, device=device)
        self._totals: dict[str, torch.Tensor] = {}
        if par.is_main:
            print(self.layout.describe(), flush=True)

    def schedule(self, t: int) -> tuple[list[TimedStage], Any]:
        """This rank's PipelineStages and the schedule for sequences of t tokens. Their activations' shapes
        are given, not inferred by a trial forward, so a new length (SFT pads each batch to its longest row)
        gets its own, built on first use (a pipeline's ranks see the same rows, so they build it together);
        the last few are kept."""
        if t not in self._schedules:
            if len(self._schedules) == KEPT_SCHEDULES:
                self._schedules.popitem(last=False)
            stages = [self._stage(module, t) for module in self.modules]
            cls = SCHEDULES[self.layout.schedule].cls
            schedule = cls(
                stages[0] if len(stages) == 1 else stages,
                self.layout.microbatches,
                loss_fn=self._loss,
                scale_grads=False,  # the loss is already a share of the step's token mean
            )
            self._schedules[t] = (stages, schedule)
        self._schedules.move_to_end(t)
        return self._schedules[t]

    def _stage(self, module: StageModule, t: int) -> TimedStage:
        """A PipelineStage for micro-batches of t tokens; the activations require grad, so that their
        gradients travel back."""
        b, spec = self.layout.microbatch_size, module.spec

        def acts() -> tuple[torch.Tensor, ...]:
            return tuple(
                torch.empty(b, t, self.hidden, dtype=self.act_dtype, device="meta", requires_grad=True)
                for _ in range(self.n_acts)
            )

        inputs = (torch.empty(b, t, dtype=torch.long, device="meta"),) if spec.first else acts()
        outputs = (torch.empty(1 + self.depths, device="meta", requires_grad=True),) if spec.last else acts()
        n_stages = len(self.layout.stages)
        return TimedStage(module, spec.index, n_stages, self.device, inputs, outputs, group=self.par.pp_group)

    @property
    def n_acts(self) -> int:
        """Activations between stages: the hidden state, and the token embeddings while MTP trains."""
        return 2 if self.depths else 1

    # --- training ---------------------------------------------------------------------------------
    def _loss(self, sums: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch: its summed token losses as shares of the step's means
        (Trainer.compute_loss's token terms, times the replicas, whose gradients FSDP averages)."""
        per_head = sums / self._counts
        lm = per_head[0]
        mtp = per_head[1:].mean() if self.depths else lm.new_zeros(())
        self._totals["lm_loss"] += lm.detach().float()
        self._totals["mtp_loss"] += mtp.detach().float()
        return self.par.replicas * (lm + self.mtp_lambda * mtp)

    def step(
        self, inputs: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """Forward and backward of one global batch's rows for this replica: (this rank's shares of the
        loss parts, its stages' expert loads, timing metrics), to be summed over all ranks by the trainer."""
        self._counts = counts.clamp(min=1).to(self.device)
        zero = torch.zeros((), device=self.device)
        self._totals = {"lm_loss": zero.clone(), "mtp_loss": zero.clone()}
        stages, schedule = self.schedule(inputs.shape[1])
        for module, stage in zip(self.modules, stages, strict=True):
            module.begin_step()
            stage.seconds = 0.0
        args = (inputs,) if self.holds_first else ()
        start = time.perf_counter()
        schedule.step(*args, target=targets, targets=targets, return_outputs=False)
        seconds = time.perf_counter() - start
        chunks = self.layout.microbatches * self.par.replicas  # balance: a mean over every micro-batch
        balance = sum(m.balance.to(self.device) for m in self.modules) / chunks
        totals = {**self._totals, "balance_loss": balance}
        loads = {name: load for m in self.modules for name, load in m.loads.items()}
        return totals, loads, self._timing(stages, seconds)

    def _timing(self, stages: list[TimedStage], seconds: float) -> dict[str, Any]:
        """bubble_fraction: the share of the step's wall time that ranks spent waiting (1 - compute / wall,
        over all ranks); stage_compute_s: each stage's forward + backward seconds (mean over replicas)."""
        n = len(self.layout.stages)
        times = torch.zeros(n + 1, dtype=torch.float64, device=self.device)
        for stage in stages:
            times[stage.stage_index] = stage.seconds
        times[n] = seconds
        times = (parallel.all_reduce_sum(times, self.par) / self.par.replicas).tolist()
        compute, wall = times[:n], times[n]
        return {"bubble_fraction": round(1 - sum(compute) / wall, 4), "stage_compute_s": [round(c, 4) for c in compute]}

    # --- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_sums(
        self, inputs: torch.Tensor, targets: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, summed loss of the text tokens) of a whole batch, the stages' forwards run in order
        by hand (one batch, no micro-batches: evaluation has no backward to overlap); zeros on ranks
        without the last stage."""
        text_targets = None if torch.equal(text, targets) else text
        acts: tuple[torch.Tensor, ...] = (inputs,)
        sums = torch.zeros(2, device=self.device)
        me = self.par.pp_rank
        for module in self.modules:
            spec = module.spec
            if not spec.first and self.layout.rank_of(spec.index - 1) != me:
                acts = self._recv(inputs.shape, self.layout.rank_of(spec.index - 1))
            out = module(*acts, targets=targets, text_targets=text_targets, mtp=False)
            if spec.last:
                sums = out
                continue
            acts = out
            if self.layout.rank_of(spec.index + 1) != me:
                for t in acts:
                    dist.send(t.contiguous(), group=self.par.pp_group, group_dst=self.layout.rank_of(spec.index + 1))
        return sums[0], sums[1]

    def _recv(self, shape: torch.Size, src: int) -> tuple[torch.Tensor, ...]:
        h = torch.empty(*shape, self.hidden, dtype=self.act_dtype, device=self.device)
        dist.recv(h, group=self.par.pp_group, group_src=src)
        return (h,)

    # --- checkpoints ------------------------------------------------------------------------------
    def full_state(self, model: Transformer, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Every tensor of the whole model and its optimizer state, under the one-process names, on the
        first rank (collective; the other ranks get empty dicts)."""
        for module in self.modules:  # stage roots stay unsharded after a step; the optimizer holds shards
            if hasattr(module, "reshard"):
                module.reshard()
        local = parallel.full_state(model, optimizer, self.par)
        if self.par.replica_rank != 0:  # replica 0's pipeline holds every tensor once
            return {}, {}
        parts: list[Any] | None = [None] * self.par.pp if self.par.is_main else None
        dist.gather_object(local, parts, group=self.par.pp_group, group_dst=0)
        if parts is None:
            return {}, {}
        model_state, optim_state = {}, {}
        for m, o in parts:
            model_state |= m
            optim_state |= o
        return model_state, optim_state

    def load_full_state(
        self, model: Transformer, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict
    ) -> None:
        """Load this rank's part of a full checkpoint (written by any layout)."""
        unknown = set(model_state) - self.full_names
        if unknown:
            from nanoseek.checkpoint import CheckpointError

            raise CheckpointError(f"checkpoint does not fit the model: unexpected {sorted(unknown)[:5]}")
        held = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        mine = {k: v for k, v in model_state.items() if k in held}
        parallel.load_full_state(model, optimizer, mine, optim_state, self.par)
