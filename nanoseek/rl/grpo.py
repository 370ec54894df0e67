"""GRPO with rule-based rewards (DeepSeekMath Sec. 4, DeepSeek-R1 Sec. 2.2), on a CPU.

    nanoseek grpo --model runs/sft/model --task arithmetic --out runs/grpo

Each step: P training problems, G completions each sampled by the engine (which shares the policy's
weights, so rollouts always come from the current policy), rewards from the reward functions (by
default the task's verifier plus R1's format reward, optionally with DAPO's overlong penalty),
group-relative advantages, then mu optimizer steps on the clipped objective with a k3 KL to a frozen
reference (not built at all when beta is 0). With dynamic sampling, groups whose rewards are all equal
(no signal) are dropped, as DAPO does. Held-out pass@1 is measured before training, every eval_every
steps and at the end; metrics use TRL's names.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanoseek.checkpoint import from_pretrained
from nanoseek.device import default_device
from nanoseek.rl.config import GRPOConfig
from nanoseek.rl.evaluate import completion_text, evaluate
from nanoseek.rl.grpo_loss import group_advantages, grpo_loss
from nanoseek.rl.rewards import load_reward, overlong_penalty, reward_name
from nanoseek.rl.tasks import get_task
from nanoseek.serve.engine import Engine
from nanoseek.serve.sampling import SamplingParams
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train import loop, parallel
from nanoseek.train.optim import build_optimizer, lr_at
from nanoseek.train.run import RunFolder

RESUME_MUST_MATCH = ("model", "task", "seed", "prompts_per_step", "group_size", "max_tokens", "rewards")


def token_logprobs(
    model, ids: torch.Tensor, start: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, L] (prompt then completion, right-padded); start [N] where each completion begins.
    Returns per-position log-probabilities of the next token and the entropy, both [N, L - 1]: position
    t scores token t + 1, so the completion's tokens sit at t >= start - 1."""
    logits = model(ids[:, :-1]).float() / temperature
    logprobs = logits.log_softmax(-1)
    chosen = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return chosen, entropy


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        # A resumed run must draw the same problems and groups its checkpoint stood in.
        self.run = RunFolder(self.out, "grpo", dataclasses.asdict(cfg), RESUME_MUST_MATCH)
        self.device = default_device()
        self.task = get_task(cfg.task)
        self.tokenizer = load_tokenizer(cfg.model)
        self.policy = from_pretrained(cfg.model, dtype=torch.float32, device=self.device)
        # The reference is a frozen copy of the starting policy, and only exists when the KL term does.
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False) if cfg.beta > 0 else None
        self.engine = Engine(self.policy, self.tokenizer, cfg.engine, device=self.device)
        self.optimizer = build_optimizer(self.policy, cfg.lr, 0.0, (0.9, 0.99))
        self.par = parallel.Parallel()  # one process; checkpoints in the trainer's format
        self.reward_paths = [p.strip() for p in cfg.rewards.split(",") if p.strip()]
        self.reward_fns = [load_reward(p) for p in self.reward_paths]
        weights = cfg.reward_weights.split(",") if cfg.reward_weights else ["1"] * len(self.reward_fns)
        if len(weights) != len(self.reward_fns):
            raise ValueError(f"--reward-weights has {len(weights)} values for {len(self.reward_fns)} reward functions")
        self.reward_weights = [float(w) for w in weights]
        self.train_problems = self.task.problems("train", min(cfg.steps * cfg.prompts_per_step, 20_000), cfg.seed)
        self.test_problems = self.task.problems("test", cfg.eval_n, cfg.seed) if cfg.eval_n else []
        self.step = 0

    # --- rollouts and rewards --------------------------------------------------------------------
    def rollouts(self, problems) -> tuple[list[list[int]], list[list[int]], list[str]]:
        cfg = self.cfg
        prompts = [self.tokenizer.apply_chat_template(p.messages(), tokenize=True) for p in problems]
        requests = [ids for ids in prompts for _ in range(cfg.group_size)]
        seeds = [cfg.seed * 1_000_003 + self.step * 10_000 + i for i in range(len(requests))]
        params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=s) for s in seeds]
        self.policy.eval()
        self.engine.reset_prefix_cache()  # cached latents came from the weights before the last update
        outputs = self.engine.generate(requests, params)
        completions = [o.token_ids for o in outputs]
        return requests, completions, [completion_text(self.engine, c) for c in completions]

    def score(self, problems, completions: list[list[int]], texts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """Rewards [P, G] and each function's mean."""
        cfg, g = self.cfg, self.cfg.group_size
        parts = torch.tensor(
            [[fn(text, problems[i // g], self.task) for fn in self.reward_fns] for i, text in enumerate(texts)]
        )  # [P*G, F]
        total = parts @ torch.tensor(self.reward_weights)
        if cfg.overlong_buffer:
            total += torch.tensor([overlong_penalty(len(c), cfg.max_tokens, cfg.overlong_buffer) for c in completions])
        means = {f"rewards/{reward_name(p)}/mean": parts[:, i].mean().item() for i, p in enumerate(self.reward_paths)}
        return total.view(-1, g), means

    # --- one step --------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg, start = self.cfg, time.perf_counter()
        first = (self.step * cfg.prompts_per_step) % len(self.train_problems)
        problems = (self.train_problems * 2)[first : first + cfg.prompts_per_step]
        prompts, completions, texts = self.rollouts(problems)
        rollout_seconds = time.perf_counter() - start
        rewards, reward_means = self.score(problems, completions, texts)
        advantages = group_advantages(rewards, cfg.scale_rewards)  # [P, G]
        zero_std = rewards.std(dim=1) == 0
        keep = (
            (~zero_std).repeat_interleave(cfg.group_size)
            if cfg.dynamic_sampling
            else torch.ones(len(texts), dtype=torch.bool)
        )
        metrics: dict[str, Any] = {
            "step": self.step + 1,
            "reward": rewards.mean().item(),
            "reward_std": rewards.std(dim=1).mean().item(),
            **reward_means,
            "frac_reward_zero_std": zero_std.float().mean().item(),
            "completions/mean_length": sum(map(len, completions)) / len(completions),
            "rollout_tokens_per_s": sum(map(len, completions)) / rollout_seconds,
            "completions/clipped_ratio": sum(len(c) >= cfg.max_tokens for c in completions) / len(completions),
            "tokens/rollout": sum(len(p) + len(c) for p, c in zip(prompts, completions, strict=True)),
        }
        rows = keep.nonzero().flatten().tolist()
        lr = lr_at(self.step, cfg.steps, cfg.lr, cfg.warmup_steps, "wsd", 1.0)
        if rows:
            metrics |= self.update(
                [prompts[i] for i in rows], [completions[i] for i in rows], advantages.flatten()[rows], lr
            )
        self.step += 1
        metrics |= {"lr": lr, "seconds": time.perf_counter() - start, "samples": {"completion": texts[0][:200]}}
        return metrics

    def update(
        self, prompts: list[list[int]], completions: list[list[int]], advantages: torch.Tensor, lr: float
    ) -> dict[str, float]:
        cfg = self.cfg
        width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        ids = torch.full((len(prompts), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), width - 1)  # over next-token positions
        for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            mask[row, len(p) - 1 : len(p) + len(c) - 1] = 1
        ids, mask, advantages = ids.to(self.device), mask.to(self.device), advantages.to(self.device)
        start = torch.tensor([len(p) for p in prompts])
        self.policy.train()
        with torch.no_grad():
            old = token_logprobs(self.policy, ids, start, cfg.temperature)[0] if cfg.mu > 1 else None
            ref = token_logprobs(self.reference, ids, start, cfg.temperature)[0] if self.reference else None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats: dict[str, float] = {}
        for _ in range(cfg.mu):
            logp, entropy = token_logprobs(self.policy, ids, start, cfg.temperature)
            loss, stats = grpo_loss(
                logp,
                logp.detach() if old is None else old,
                advantages,
                mask,
                ref_logp=ref,
                beta=cfg.beta,
                epsilon=cfg.epsilon,
                epsilon_high=cfg.epsilon_high,
                loss_type=cfg.loss_type,
                max_tokens=cfg.max_tokens,
            )
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip).item()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        entropy = float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
        passes = cfg.mu + (cfg.mu > 1) + (self.reference is not None)  # forward passes: trained, old, reference
        return {
            "loss": loss.item(),
            **stats,
            "entropy": entropy,
            "grad_norm": grad_norm,
            "tokens/trained": ids.numel() * cfg.mu,
            "tokens/scored": ids.numel() * (passes - cfg.mu),
        }

    def evaluate(self) -> float:
        self.policy.eval()
        self.engine.reset_prefix_cache()
        return evaluate(self.engine, self.task, self.test_problems, max_tokens=self.cfg.max_tokens).pass_at_1

    # --- run folder (train/run.py) -------------------------------------------------------------
    def save(self) -> None:
        """A resumable checkpoint, and the policy as a model folder (swapped in whole)."""
        model_state, optim_state = parallel.full_state(self.policy, self.optimizer, self.par)
        self.run.save(self.step, model_state, optim_state, {}, keep=2)
        self.run.export(self.policy, self.tokenizer)

    def restore(self, saved: tuple[dict, dict, dict]) -> None:
        model_state, optim_state, extra = saved
        parallel.load_full_state(self.policy, self.optimizer, model_state, optim_state, self.par)
        self.step = int(extra["step"])

    # --- the loop (train/loop.py) ------------------------------------------------------------------
    name = "grpo"

    @property
    def steps(self) -> int:
        return self.cfg.steps

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every

    @property
    def save_every(self) -> int:
        return self.cfg.save_every

    def before(self) -> dict[str, Any] | None:
        """Held-out pass@1 of the starting policy, the run's first row."""
        if not self.test_problems:
            return None
        row = {"step": 0, "eval/pass_at_1": self.evaluate()}
        tqdm.write(f"step 0 | held-out pass@1 {row['eval/pass_at_1']:.3f}")
        return row

    def eval_into(self, metrics: dict[str, Any]) -> list[str]:
        if not self.test_problems:
            return []
        metrics["eval/pass_at_1"] = self.evaluate()
        return [f"step {self.step} | held-out pass@1 {metrics['eval/pass_at_1']:.3f}"]

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {"reward": f"{metrics['reward']:.3f}", "len": f"{metrics['completions/mean_length']:.0f}"}

    def fit(self) -> list[dict[str, Any]]:
        return loop.fit(self, self.run, self.cfg.resume, self.cfg.progress)


def run(cfg: GRPOConfig) -> int:
    """`nanoseek grpo`: train to the end; the first process reports held-out pass@1 before and after."""
    trainer, history = parallel.fit(GRPOTrainer(cfg))
    evals = [m["eval/pass_at_1"] for m in history if "eval/pass_at_1" in m]
    if len(evals) >= 2 and trainer.par.is_main:
        print(f"held-out pass@1: {evals[0]:.3f} before, {evals[-1]:.3f} after -> {cfg.out}/model")
    return 0
