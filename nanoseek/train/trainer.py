"""The one training loop: pretraining, and supervised fine-tuning (and distillation, which is SFT on a
teacher's traces) from a model folder.

    nanoseek train --preset tiny --steps 300 --out runs/tiny     # trains on Python's own stdlib source
    torchrun --nproc-per-node 2 -m nanoseek train --preset tiny --ep 2 --out runs/ep2   # FSDP2 + EP
    torchrun --nproc-per-node 2 -m nanoseek train --preset tiny --pp 2 --out runs/pp2   # pipeline stages
    nanoseek sft --model runs/tiny/model --data chat.jsonl --out runs/sft   # loss on assistant tokens only

Loss = next-token cross-entropy + mtp_lambda * mean MTP cross-entropy (V3 Sec. 2.2.2, eq. 24-25)
+ balance_alpha * the sequence-wise balance loss (Sec. 2.1.2, eq. 17-20). After every optimizer step,
each MoE gate's bias moves by bias_gamma * sign(mean load - load) (auxiliary-loss-free balancing; gamma V3's
1e-3, raised for short runs: moe.bias_gamma_for).
AdamW, warmup then cosine or WSD, clipping, accumulation, bf16 autocast where the hardware is fast at
it, exact resume from atomic checkpoints.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig, get_preset
from nanoseek.data import IGNORE, ChatLoader, PackedLoader, ensure_default_data
from nanoseek.device import default_device, default_dtype
from nanoseek.fp8 import convert_to_fp8
from nanoseek.model import Transformer
from nanoseek.model.moe import BalancingHook, bias_gamma_for
from nanoseek.tokenizer import Tokenizer, load_tokenizer
from nanoseek.train import loop, parallel
from nanoseek.train.config import SFTConfig, TrainConfig
from nanoseek.train.optim import build_optimizer, lr_at
from nanoseek.train.run import RunFolder
from nanoseek.train.samples import sample_text
from nanoseek.train.throughput import bits_per_byte, peak_flops, token_bytes, train_flops_per_token

RESUME_MUST_MATCH = ("preset", "data", "seed", "batch_size", "seq_len", "init", "objective")  # fix the data stream
SAMPLE_PROMPTS = ("def ", "class ")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the trained positions (targets != IGNORE) from whole logits [B, T, V] (the
    logit-distillation path; training otherwise takes the model's fused, chunked loss)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def distillation_kl(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """KL(teacher || student) over trained positions (targets != IGNORE), their mean or sum; logits [B, T, V]."""
    keep = targets != IGNORE
    s, t = student[keep].float().log_softmax(-1), teacher[keep].float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.sum() if reduction == "sum" else kl.mean() if keep.any() else student.new_zeros(())


def trained_tokens(targets: torch.Tensor, depths: int) -> torch.Tensor:
    """How many positions each loss trains: the main head's, then each MTP depth's. [1 + depths]"""
    return torch.stack([(mtp_targets(targets, k) != IGNORE).sum() for k in range(depths + 1)])


def mtp_targets(targets: torch.Tensor, depth: int) -> torch.Tensor:
    """Depth k predicts token i+k+1 at position i: the next-token targets shifted left by k."""
    return targets[:, depth:]


class Trainer(loop.Cadence):
    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig | None = None, tokenizer: Tokenizer | None = None):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.device, self.par = self._placement()
        self.amp_dtype = default_dtype(self.device) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        initial, model_cfg, self.tokenizer, self.data_dir = self._starting_point(model_cfg, tokenizer)
        self.model, self.moe_names, self.pipeline = self._model(initial, model_cfg)
        self.moe = self.model.moe_layers()  # this rank's (a pipeline stage holds some)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.bias_gamma = cfg.bias_gamma if cfg.bias_gamma is not None else bias_gamma_for(cfg.steps, cfg.init)
        gates = {name: moe.gate for name, moe in self.moe}
        self.balancing = BalancingHook(self.optimizer, gates, self.bias_gamma) if self.bias_gamma > 0 else None
        self.loader, self.val_loader = self._loaders()
        self.run = RunFolder(self.out, "train", dataclasses.asdict(cfg), RESUME_MUST_MATCH)
        self.token_bytes, self.val_bpb = token_bytes(self.tokenizer), None
        self.flops_per_token = train_flops_per_token(self.model.cfg, cfg.seq_len, mtp=self.mtp_depths > 0)
        # MFU against the peak of the run's GEMMs (FP8's for an FP8 run), and against the compute dtype's too
        self.peak_flops, self.peak_source = peak_flops(self.device, self.amp_dtype, cfg.peak_flops, fp8=cfg.fp8)
        self.dense_peak = peak_flops(self.device, self.amp_dtype, cfg.peak_flops)[0]
        self.teacher = self._teacher() if cfg.kl_weight > 0 else None
        self.step, self.tokens = 0, 0

    # --- the builders -------------------------------------------------------------------------------
    def _placement(self) -> tuple[torch.device, parallel.Parallel]:
        """The device and the process layout (one process, or this rank's place under torchrun)."""
        cfg = self.cfg
        device = default_device() if cfg.device == "auto" else torch.device(cfg.device)
        par = parallel.init(cfg.ep, device.type, cfg.pp)
        if device.type == "cuda" and par.distributed:
            device = torch.device("cuda", par.local_rank)
            torch.cuda.set_device(device)
        if cfg.batch_size % (par.replicas * max(1, cfg.micro_batch_size)):
            raise ValueError(
                f"--batch-size {cfg.batch_size} must split evenly over {par.replicas} data-parallel "
                f"process(es) and --micro-batch-size {cfg.micro_batch_size}"
            )
        return device, par

    def _starting_point(
        self, model_cfg: ModelConfig | None, tokenizer: Tokenizer | None
    ) -> tuple[Transformer | None, ModelConfig, Tokenizer, Path]:
        """(the model to fine-tune or None, the model's config, the tokenizer, the data folder). A fine-tune's
        model folder brings its config and tokenizer; a fresh model takes the tokenizer's vocabulary."""
        cfg, initial = self.cfg, None
        if cfg.init:
            from nanoseek.checkpoint import from_pretrained

            initial = from_pretrained(cfg.init, dtype=torch.float32)
            model_cfg, tokenizer = initial.cfg, tokenizer or load_tokenizer(cfg.init)
        data_dir = Path(cfg.data) if cfg.data else None
        if data_dir is None:  # built once, by the first process
            vocab = (model_cfg or get_preset(cfg.preset)).vocab_size
            if self.par.is_main:
                ensure_default_data(vocab, progress=cfg.progress)
            parallel.barrier(self.par)
            data_dir = ensure_default_data(vocab, progress=False)
        tokenizer = tokenizer or load_tokenizer(data_dir / "tokenizer")
        model_cfg = model_cfg or get_preset(cfg.preset)
        if initial is None:
            model_cfg = model_cfg.replace(
                vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id
            )
        if not model_cfg.num_nextn_predict_layers < cfg.seq_len <= model_cfg.max_position_embeddings:
            raise ValueError(
                f"--seq-len must lie in ({model_cfg.num_nextn_predict_layers}, "
                f"{model_cfg.max_position_embeddings}] for this model"
            )
        return initial, model_cfg, tokenizer, data_dir

    def _model(self, initial: Transformer | None, model_cfg: ModelConfig):
        """The model on its device, FP8 if asked, laid out over the processes: (model, the whole model's MoE
        layer names, the pipeline or None)."""
        cfg = self.cfg
        if cfg.pp > 1:
            from nanoseek.train import pipeline

            pipeline.check_supported(cfg, model_cfg)
        torch.manual_seed(cfg.seed)  # every rank builds the same initial model, then keeps its shards
        model = (initial or Transformer(model_cfg)).to(self.device)
        if cfg.fp8:
            convert_to_fp8(model)
        moe_names = [name for name, _ in model.moe_layers()]  # before a pipeline rank drops its other stages
        gpu_bf16 = self.device.type == "cuda" and self.amp_dtype == torch.bfloat16
        param_dtype = torch.bfloat16 if gpu_bf16 else None
        if cfg.pp > 1:  # this rank keeps its stages' modules only
            depths = model_cfg.num_nextn_predict_layers if cfg.mtp_lambda > 0 else 0
            stages = pipeline.Pipeline(model, self.par, cfg, self.device, depths, self.autocast, param_dtype)
            return model, moe_names, stages
        parallel.apply(model, self.par, param_dtype=param_dtype)
        return model, moe_names, None

    def _teacher(self) -> Transformer:
        """Logit distillation's teacher: it only scores, never trains."""
        from nanoseek.checkpoint import from_pretrained

        teacher = from_pretrained(self.cfg.teacher, dtype=torch.float32, device=self.device).eval()
        teacher.requires_grad_(False)
        if teacher.cfg.vocab_size != self.model.cfg.vocab_size:
            sizes = f"the teacher has {teacher.cfg.vocab_size} tokens, the student {self.model.cfg.vocab_size}"
            raise ValueError(f"logit distillation needs one vocabulary: {sizes}")
        return teacher

    def _loaders(self) -> tuple[PackedLoader | ChatLoader, PackedLoader | ChatLoader | None]:
        # The ranks of one pipeline read the same rows: the rows split over the data-parallel replicas.
        cfg, rank, world = self.cfg, self.par.replica_rank, self.par.replicas
        if cfg.objective == "sft":
            train = ChatLoader(
                self.data_dir, self.tokenizer, "train", cfg.batch_size, cfg.seq_len, cfg.seed, rank, world
            )
            try:
                val = ChatLoader(
                    self.data_dir, self.tokenizer, "val", world, cfg.seq_len, 0, rank, world, shuffle=False
                )
            except ValueError:  # fewer held-out examples than processes: no validation loss
                return train, None
            val.batch_size = min(cfg.batch_size, val.n_windows) // world * world
            return train, val
        train = PackedLoader(self.data_dir, "train", cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
        val_windows = PackedLoader.count_windows(self.data_dir, "val", cfg.seq_len)
        val_batch = min(cfg.batch_size, val_windows) // world * world
        if val_batch == 0:
            return train, None
        return train, PackedLoader(self.data_dir, "val", val_batch, cfg.seq_len, 0, rank, world, shuffle=False)

    @staticmethod
    def inputs_and_targets(
        batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A packed window [B, T+1], or chat (ids, labels) [B, T+1] each -> inputs and next-token targets."""
        if isinstance(batch, tuple):
            ids, labels = batch
            return ids[:, :-1], labels[:, 1:]
        return batch[:, :-1], batch[:, 1:]

    # --- one optimizer step ------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def mtp_depths(self) -> int:
        # From the config: a pipeline rank without the last stage holds no MTP module.
        return self.model.cfg.num_nextn_predict_layers if self.cfg.mtp_lambda > 0 else 0

    def compute_loss(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        counts: torch.Tensor | None = None,
        chunks: int = 1,
        world: int = 1,
    ) -> dict[str, torch.Tensor]:
        """inputs, targets [B, T] (targets IGNORE where nothing is learnt) -> the loss and its parts.

        counts: the trained tokens of the whole step (every micro-batch, every rank) for the main head and
        each MTP depth (None: this batch's own). Token losses are summed and divided by them once, so a
        token weighs the same however the step is split (a mean of micro-batch means would not: a row
        with few trained tokens would weigh more in a small micro-batch). The returned parts are this
        batch's shares of the step's means; the balance loss, a mean over sequences, is one chunk's.
        world: gradients are averaged over ranks (FSDP, the expert sync), so the token terms, shares of a
        global sum, are scaled by it in `loss`; the balance term, a mean, is not."""
        depths = self.mtp_depths
        counts = (counts if counts is not None else trained_tokens(targets, depths)).clamp(min=1).to(self.device)
        for _, moe in self.moe:
            moe.expert_load = moe.balance_loss = None
        with self.autocast():
            if self.teacher is None:  # summed token losses [1 + depths], the logits never held whole
                sums = self.forward(inputs, mtp=depths > 0, targets=targets)
            else:  # the KL term needs the student's logits
                logits, mtp_logits = self.forward(inputs, mtp=True) if depths else (self.forward(inputs), [])
                sums = torch.stack([lm_loss(lg, mtp_targets(targets, k)) for k, lg in enumerate([logits, *mtp_logits])])
        per_head = sums / counts
        lm = per_head[0]
        zero = lm.new_zeros(())
        mtp = per_head[1:].mean() if depths else zero
        balance = [m.balance_loss for _, m in self.moe if m.balance_loss is not None]
        bal = torch.stack(balance).sum() if balance else zero  # alpha applies per MoE layer (V3 eq. 17)
        tokens = lm + self.cfg.mtp_lambda * mtp
        parts = {"lm_loss": lm.detach(), "mtp_loss": mtp.detach(), "balance_loss": bal.detach()}
        if self.teacher is not None:
            kl = distillation_kl(logits, self.teacher_logits(inputs), targets, "sum") / counts[0]
            tokens = tokens + self.cfg.kl_weight * kl
            parts["kl_loss"] = kl.detach()
        return {"loss": world * tokens + self.cfg.balance_alpha * bal / chunks, **parts}

    @torch.no_grad()
    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.teacher(inputs)  # in eval mode: no routing statistics, no gradients

    def train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.model.train()
        inputs, targets = self.inputs_and_targets(self.loader.next_batch())
        # The step's trained tokens over every micro-batch and replica (one all-reduce): each token loss is
        # divided by them once (compute_loss).
        counts = trained_tokens(targets, self.mtp_depths).to(self.device).float()
        counts = parallel.replica_sum(counts, self.par)
        if self.pipeline is None:
            totals, loads = self.forward_backward(inputs, targets, counts)
            extra = {}
        else:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            totals, loads, extra = self.pipeline.step(inputs, targets, counts)
        return self.optimizer_step(totals, loads, inputs.numel(), start) | extra

    def forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One process's part of a step, micro-batch by micro-batch: (the loss parts as its shares of the step's
        means, the expert loads of its MoE layers)."""
        size = self.cfg.micro_batch_size or len(inputs)
        chunks = list(zip(inputs.split(size), targets.split(size), strict=True))
        loads = {name: torch.zeros(m.cfg.n_routed_experts, device=self.device) for name, m in self.moe}
        totals: dict[str, torch.Tensor] = {}
        for x, y in chunks:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            parts = self.compute_loss(x, y, counts, chunks=len(chunks), world=self.par.world)
            parts["loss"].backward()
            for name, moe in self.moe:
                if moe.expert_load is not None:
                    loads[name] += moe.expert_load
            parts["balance_loss"] = parts["balance_loss"] / (len(chunks) * self.par.world)  # a mean over all
            for k, v in parts.items():
                if k != "loss":
                    totals[k] = totals.get(k, 0.0) + v.detach().float()
        return totals, loads

    def optimizer_step(
        self, totals: dict[str, torch.Tensor], loads: dict[str, torch.Tensor], rows: int, start: float
    ) -> dict[str, Any]:
        """Sum the ranks' loss shares and expert loads, clip, step the optimizer and the balancing biases;
        the step's metrics. rows: the tokens this rank's replica read."""
        cfg = self.cfg
        # Every rank reports the step's global means and balances with the global expert loads.
        names = list(totals)
        sums = parallel.all_reduce_sum(torch.stack([totals[k] for k in names]), self.par)
        totals = dict(zip(names, sums.tolist(), strict=True))
        kl = cfg.kl_weight * totals.get("kl_loss", 0.0)
        totals["loss"] = (
            totals["lm_loss"] + cfg.mtp_lambda * totals["mtp_loss"] + cfg.balance_alpha * totals["balance_loss"] + kl
        )
        loads = self.global_loads(loads)
        parallel.sync_expert_grads(self.model, self.par)
        grad_norm = parallel.clip_grad_norm(self.model, cfg.grad_clip, self.par)
        lr = lr_at(self.step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.balancing is not None:
            self.balancing.loads = loads  # the biases move once the optimizer has stepped
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - start
        metrics: dict[str, Any] = {"step": self.step, **totals, "grad_norm": grad_norm, "lr": lr}
        self.tokens += rows * self.par.replicas  # all replicas together (padding included in SFT)
        metrics["tokens_per_s"] = rows * self.par.replicas / seconds
        metrics["flops_per_s"] = metrics["tokens_per_s"] * self.flops_per_token  # all ranks together
        metrics["mfu"] = metrics["flops_per_s"] / (self.peak_flops * self.par.world)
        metrics["mfu_dense"] = metrics["flops_per_s"] / (self.dense_peak * self.par.world)
        metrics["peak_flops"], metrics["peak_flops_dense"] = self.peak_flops, self.dense_peak
        metrics["tokens"] = self.tokens
        used = [(name, load) for name, load in loads.items() if load.sum() > 0]
        metrics["max_over_mean_load"] = {n: round((ld.max() / ld.mean()).item(), 4) for n, ld in used}
        metrics["expert_load"] = {n: (ld / ld.sum()).tolist() for n, ld in used}
        return metrics

    def global_loads(self, loads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every MoE layer's expert loads summed over all ranks (one all-reduce; a pipeline rank fills in the
        layers it holds, zeros elsewhere)."""
        experts = self.model.cfg.n_routed_experts
        local = torch.zeros(len(self.moe_names), experts, device=self.device)
        for i, name in enumerate(self.moe_names):
            if name in loads:
                local[i] = loads[name].to(self.device)
        return dict(zip(self.moe_names, parallel.all_reduce_sum(local, self.par), strict=True))

    # --- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_loader is None:
            return None
        self.model.eval()
        self.val_loader.load_state_dict({"epoch": 0, "cursor": 0})  # the same windows every time
        n = min(self.cfg.eval_batches, self.val_loader.n_windows // self.val_loader.batch_size)
        # Summed token losses and trained tokens (the loss, a mean over all), and the losses of the targets
        # that carry text with their bytes (bits per byte: a special token's target has no bytes, so its loss
        # is left out, as nanochat does).
        total = torch.zeros(4, dtype=torch.float64, device=self.device)
        sizes = self.token_bytes.to(self.device)
        for _ in range(n):
            inputs, targets = self.inputs_and_targets(self.val_loader.next_batch())
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            text = torch.where(sizes[targets.clamp(min=0)] > 0, targets, IGNORE)
            loss_sum, text_sum = self.eval_sums(inputs, targets, text)
            if self.pipeline is not None and not self.pipeline.holds_last:
                continue  # the last stage's ranks count each replica's tokens once
            kept = targets[targets != IGNORE]
            count, n_bytes = kept.new_tensor(kept.numel()).double(), sizes[kept].sum()
            total += torch.stack([loss_sum.double(), count, text_sum.double(), n_bytes])
        loss_sum, count, text_sum, n_bytes = parallel.all_reduce_sum(total, self.par).tolist()
        self.val_bpb = bits_per_byte(text_sum, n_bytes)
        return loss_sum / max(count, 1)

    def eval_sums(
        self, inputs: torch.Tensor, targets: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss of a batch and that of its text tokens (collective under a pipeline)."""
        if self.pipeline is not None:
            return self.pipeline.eval_sums(inputs, targets, text)
        # A second pass for the text tokens where some rank's targets hold special tokens: on all ranks or none,
        # since a sharded forward is collective (one rank's extra pass would wait forever for its peers).
        second = parallel.any_rank(not torch.equal(text, targets), self.par)
        with self.autocast():
            loss_sum = self.forward(inputs, targets=targets)[0]
            text_sum = self.forward(inputs, targets=text)[0] if second else loss_sum
        return loss_sum, text_sum

    def samples(self) -> dict[str, str]:
        n, context = self.cfg.sample_tokens, self.cfg.seq_len
        if n <= 0:
            return {}
        model = self.model
        if self.pipeline is not None:  # the whole model, gathered to the first process, samples there
            model_state, _ = self.full_state()
            if not self.par.is_main:
                return {}
            model = self.plain_model(model_state).to(self.device)
        prompts = list(SAMPLE_PROMPTS)
        if isinstance(self.loader, ChatLoader):  # fine-tuning: the first held-out (or training) conversations
            chats = (self.val_loader or self.loader).prompts[:2]
            prompts = [self.tokenizer.apply_chat_template(m) for m in chats]
        return {
            p: sample_text(model, self.tokenizer, p, n, seed=1000 * self.step + i, max_context=context)
            for i, p in enumerate(prompts)
        }

    # --- run folder (train/run.py) -------------------------------------------------------------
    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The model and optimizer tensors as one process holds them (collective; under a pipeline only the
        first process gets them)."""
        if self.pipeline is not None:
            return self.pipeline.full_state(self.model, self.optimizer)
        return parallel.full_state(self.model, self.optimizer, self.par)

    def save(self) -> None:
        """Gather the full state (collective); the first process writes it."""
        model_state, optim_state = self.full_state()
        if self.par.is_main:
            extra = {"loader": self.loader.state_dict(), "tokens": self.tokens}
            self.run.save(self.step, model_state, optim_state, extra, self.cfg.keep)
            self.export_model(model_state)
        parallel.barrier(self.par)

    def export_model(self, model_state: dict[str, torch.Tensor]) -> None:
        """The latest weights as a Hugging Face folder with the tokenizer, swapped in atomically."""
        self.run.export(self.plain_model(model_state), self.tokenizer)

    def plain_model(self, model_state: dict[str, torch.Tensor]) -> Transformer:
        """A one-process Transformer on the CPU holding a full state."""
        with torch.device("meta"):
            plain = Transformer(self.model.cfg)
        plain.to_empty(device="cpu")
        plain.load_state_dict(model_state, strict=False)  # strict below: the full state has every tensor
        plain.tie_weights()
        plain.rotary_emb.reset_parameters()
        return plain

    def restore(self, saved: tuple[dict, dict, dict]) -> None:
        model_state, optim_state, extra = saved
        if self.pipeline is not None:
            self.pipeline.load_full_state(self.model, self.optimizer, model_state, optim_state)
        else:
            parallel.load_full_state(self.model, self.optimizer, model_state, optim_state, self.par)
        self.loader.load_state_dict(extra["loader"])
        self.step, self.tokens = int(extra["step"]), int(extra.get("tokens", 0))

    # --- the loop (train/loop.py) ------------------------------------------------------------------
    name = "train"

    def before(self) -> None:
        return None

    def eval_into(self, metrics: dict[str, Any]) -> list[str]:
        metrics["val_loss"] = self.evaluate()  # every rank: the forward pass is collective
        metrics["val_bpb"] = self.val_bpb
        metrics["samples"] = self.samples()
        return [f"step {self.step} | {prompt!r} -> {text[:120]!r}" for prompt, text in metrics["samples"].items()]

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {
            "loss": f"{metrics['loss']:.3f}",
            "tok_s": f"{metrics['tokens_per_s']:.0f}",
            "mfu": f"{metrics['mfu']:.1%}",
            "lr": f"{metrics['lr']:.2e}",
        }

    def fit(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        return loop.fit(self, self.run, cfg.resume, cfg.progress, self.par.is_main, cfg.tensorboard)


def train(cfg: TrainConfig) -> int:
    """`nanoseek train`: pretrain (or fine-tune, with --objective sft) to the end; the first process reports."""
    trainer, history = parallel.fit(Trainer(cfg))
    if history and trainer.par.is_main:
        last = history[-1]
        val = next((m["val_loss"] for m in reversed(history) if m.get("val_loss") is not None), None)
        loss, speed = f"loss {last['loss']:.3f}, val loss {val if val is None else round(val, 3)}", last["tokens_per_s"]
        print(f"step {last['step']}: {loss}, {speed:.0f} tok/s; model in {cfg.out}/model")
    return 0


def sft(cfg: SFTConfig) -> int:
    """`nanoseek sft`: the trainer on chat examples, the loss on assistant tokens."""
    trainer, history = parallel.fit(Trainer(cfg.train_config()))
    if trainer.par.is_main:
        print(f"fine-tuned {cfg.steps} steps: final loss {history[-1]['loss']:.4f} -> {cfg.out}/model")
    return 0
