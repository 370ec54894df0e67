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
import json
import time
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from nanoseek.checkpoint import from_pretrained
from nanoseek.device import default_device
from nanoseek.rl.agent import Rollout, Toolbox, reply_text, run_rollouts
from nanoseek.rl.config import GRPOConfig
from nanoseek.rl.evaluate import evaluate
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
RESUME_MUST_MATCH += ("tools", "max_turns")


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


def batch_rollouts(rollouts: list[Rollout], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, L] (prompt then the rest, right-padded) and the loss mask [N, L - 1] over next-token positions:
    1 where the next token is one the policy sampled, 0 on prompts, tool results and padding."""
    width = max(len(r.prompt) + len(r.tokens) for r in rollouts)
    ids = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rollouts), width - 1)
    for row, r in enumerate(rollouts):
        ids[row, : len(r.prompt) + len(r.tokens)] = torch.tensor(r.prompt + r.tokens)
        mask[row, len(r.prompt) - 1 : len(r.prompt) + len(r.tokens) - 1] = torch.tensor(r.own, dtype=torch.float)
    return ids, mask


class GRPOTrainer(loop.Cadence):
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
        self.toolbox = Toolbox.named(cfg.tools) if cfg.tools else None
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
        self.rollout_log: IO[str] | None = None  # opened at the first step, once a resumed run knows its step

    # --- rollouts and rewards --------------------------------------------------------------------
    def rollouts(self, problems) -> list[Rollout]:
        """G rollouts per problem from the current policy; with tools, multi-turn (rl/agent.py)."""
        cfg, tools = self.cfg, self.toolbox.definitions if self.toolbox else None
        prompts = [self.tokenizer.apply_chat_template(p.messages(), tokenize=True, tools=tools) for p in problems]
        requests = [ids for ids in prompts for _ in range(cfg.group_size)]
        seeds = [cfg.seed * 1_000_003 + self.step * 10_000 + i for i in range(len(requests))]
        params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=s) for s in seeds]
        self.policy.eval()
        self.engine.reset_prefix_cache()  # cached latents came from the weights before the last update
        return run_rollouts(self.engine, requests, params, self.toolbox, cfg.max_turns if self.toolbox else 1)

    def score(self, problems, rollouts: list[Rollout]) -> tuple[torch.Tensor, dict[str, float]]:
        """Rewards [P, G] (on each rollout's last turn, its answer) and each function's mean."""
        cfg, g = self.cfg, self.cfg.group_size
        parts = torch.tensor(
            [[fn(r.text, problems[i // g], self.task) for fn in self.reward_fns] for i, r in enumerate(rollouts)]
        )  # [P*G, F]
        total = parts @ torch.tensor(self.reward_weights)
        if cfg.overlong_buffer:
            longest = cfg.max_tokens * self.turns
            total += torch.tensor(
                [overlong_penalty(r.completion_tokens, longest, cfg.overlong_buffer) for r in rollouts]
            )
        means = {f"rewards/{reward_name(p)}/mean": parts[:, i].mean().item() for i, p in enumerate(self.reward_paths)}
        return total.view(-1, g), means

    @property
    def turns(self) -> int:
        return self.cfg.max_turns if self.toolbox else 1

    def keep_rollouts(self, problems, rollouts: list[Rollout], rewards: torch.Tensor) -> None:
        """Every rollout of the step, its tool calls and reward, to DIR/rollouts.jsonl for inspection (a resumed
        run keeps the rows up to its checkpoint, as metrics.jsonl)."""
        if self.rollout_log is None:
            self.rollout_log = self.run.open_log("rollouts.jsonl", self.step, self.cfg.resume)
        g = self.cfg.group_size
        for i, (r, reward) in enumerate(zip(rollouts, rewards.flatten().tolist(), strict=True)):
            row = {
                "step": self.step + 1,
                "question": problems[i // g].question,
                "answer": problems[i // g].answer,
                "reward": reward,
                "finish_reason": r.finish_reason,
                "calls": r.calls,
                "transcript": reply_text(self.engine, r.tokens),
            }
            self.rollout_log.write(json.dumps(row) + "\n")
        self.rollout_log.flush()

    # --- one step --------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg, start = self.cfg, time.perf_counter()
        first = (self.step * cfg.prompts_per_step) % len(self.train_problems)
        problems = (self.train_problems * 2)[first : first + cfg.prompts_per_step]
        rollouts = self.rollouts(problems)
        rollout_seconds = time.perf_counter() - start
        rewards, reward_means = self.score(problems, rollouts)
        if self.par.is_main:
            self.keep_rollouts(problems, rollouts, rewards)
        advantages = group_advantages(rewards, cfg.scale_rewards)  # [P, G]
        zero_std = rewards.std(dim=1) == 0
        keep = (
            (~zero_std).repeat_interleave(cfg.group_size)
            if cfg.dynamic_sampling
            else torch.ones(len(rollouts), dtype=torch.bool)
        )
        generated = [r.completion_tokens for r in rollouts]
        metrics: dict[str, Any] = {
            "step": self.step + 1,
            "reward": rewards.mean().item(),
            "reward_std": rewards.std(dim=1).mean().item(),
            **reward_means,
            "frac_reward_zero_std": zero_std.float().mean().item(),
            "completions/mean_length": sum(generated) / len(rollouts),
            "rollout_tokens_per_s": sum(generated) / rollout_seconds,
            "completions/clipped_ratio": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            "tokens/rollout": sum(len(r.prompt) + len(r.tokens) for r in rollouts),
        }
        if self.toolbox:
            metrics |= {
                "tools/calls_per_rollout": sum(len(r.calls) for r in rollouts) / len(rollouts),
                "tools/mean_turns": sum(len(r.turns) for r in rollouts) / len(rollouts),
            }
        rows = keep.nonzero().flatten().tolist()
        lr = lr_at(self.step, cfg.steps, cfg.lr, cfg.warmup_steps, "wsd", 1.0)
        if rows:
            metrics |= self.update([rollouts[i] for i in rows], advantages.flatten()[rows], lr)
        self.step += 1
        sample = reply_text(self.engine, rollouts[0].tokens)[:300]
        metrics |= {"lr": lr, "seconds": time.perf_counter() - start, "samples": {"completion": sample}}
        return metrics

    def update(self, rollouts: list[Rollout], advantages: torch.Tensor, lr: float) -> dict[str, float]:
        cfg = self.cfg
        ids, mask = batch_rollouts(rollouts, self.tokenizer.pad_id)
        ids, mask, advantages = ids.to(self.device), mask.to(self.device), advantages.to(self.device)
        start = torch.tensor([len(r.prompt) for r in rollouts])
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
                max_tokens=cfg.max_tokens * self.turns,
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
        cfg, box = self.cfg, self.toolbox
        result = evaluate(
            self.engine, self.task, self.test_problems, max_tokens=cfg.max_tokens, toolbox=box, max_turns=cfg.max_turns
        )
        return result.pass_at_1

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
        try:
            return loop.fit(self, self.run, self.cfg.resume, self.cfg.progress)
        finally:
            if self.rollout_log is not None:
                self.rollout_log.close()


def run(cfg: GRPOConfig) -> int:
    """`nanoseek grpo`: train to the end; the first process reports held-out pass@1 before and after."""
    trainer, history = parallel.fit(GRPOTrainer(cfg))
    evals = [m["eval/pass_at_1"] for m in history if "eval/pass_at_1" in m]
    if len(evals) >= 2 and trainer.par.is_main:
        print(f"held-out pass@1: {evals[0]:.3f} before, {evals[-1]:.3f} after -> {cfg.out}/model")
    return 0
