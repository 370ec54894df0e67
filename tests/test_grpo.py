"""GRPO's objective against hand-computed numbers, the reward functions and tasks, and a short GRPO run
that raises the reward."""

import json
import math

import pytest
import torch
from serving import make_model_dir

from nanoseek.rl.evaluate import pass_at_k
from nanoseek.rl.grpo_loss import group_advantages, grpo_loss, k3_kl
from nanoseek.rl.rewards import accuracy_reward, format_reward, load_reward, overlong_penalty
from nanoseek.rl.tasks import Arithmetic, Countdown, FileTask, evaluate_expression, extract_answer, get_task


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = math.sqrt(1 / 3)  # sample std of 1, 0, 0, 1
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]) / torch.tensor([[std + 1e-4], [1e-4]])
    assert torch.allclose(group_advantages(rewards), expected)
    assert torch.equal(group_advantages(rewards, "none"), torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]))


def test_grpo_loss_clipping_kl_and_each_normaliser_by_hand():
    # Two completions: 2 tokens (advantage +1) and 1 token (advantage -1; its second position is padding).
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.7, 1.0]]))  # ratios 1.5, 0.9 | 0.7
    ref = torch.log(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    adv, mask = torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # Without KL: token losses -min(r A, clip(r, 0.8, 1.2) A): -1.2, -0.9 | -min(-0.7, -0.8) = 0.8
    loss, stats = grpo_loss(logp, old, adv, mask, epsilon=0.2)
    assert loss.item() == pytest.approx(((-1.2 - 0.9) / 2 + 0.8) / 2)
    assert stats["clip_ratio"] == pytest.approx(2 / 3)  # 1.5 > 1.2 with A > 0; 0.7 < 0.8 with A < 0
    loss, _ = grpo_loss(logp, old, adv, mask, epsilon=0.2, loss_type="dapo")
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 0.8) / 3)
    loss, _ = grpo_loss(logp, old, adv, mask, epsilon=0.2, loss_type="dr_grpo", max_tokens=4)
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 0.8) / (2 * 4))
    loss, _ = grpo_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.6)  # clip-higher: 1.5 no longer clipped
    assert loss.item() == pytest.approx(((-1.5 - 0.9) / 2 + 0.8) / 2)
    # k3 KL: exp(ref - logp) - (ref - logp) - 1 per token, averaged over real tokens
    kl = [1 / r - math.log(1 / r) - 1 for r in (1.5, 0.9, 0.7)]
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, epsilon=0.2)
    assert stats["kl"] == pytest.approx(sum(kl) / 3)
    assert loss.item() == pytest.approx(((-1.2 + 0.1 * kl[0] - 0.9 + 0.1 * kl[1]) / 2 + 0.8 + 0.1 * kl[2]) / 2)
    assert (k3_kl(logp, ref) >= 0).all()


def test_the_loss_gradient_pushes_up_good_completions():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()  # descent raises row 0's log-probs


def test_rewards_and_tasks():
    task = Arithmetic()
    [p] = task.problems("train", 1)
    good = task.solution(p)
    assert accuracy_reward(good, p, task) == 1.0 and format_reward(good, p, task) == 1.0
    wrong = good.replace(f"<answer>{p.answer}</answer>", "<answer>-1</answer>")
    assert accuracy_reward(wrong, p, task) == 0.0 and format_reward(wrong, p, task) == 1.0
    assert format_reward(f"the answer is <answer>{p.answer}</answer>", p, task) == 0.0
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    train, test = task.problems("train", 500), task.problems("test", 100)
    assert not {q.question for q in train} & {q.question for q in test}
    assert task.problems("test", 100) == test  # seeded
    countdown = Countdown()
    [c] = countdown.problems("test", 1)
    assert countdown.verify(c, countdown.solution(c)) == 1.0
    assert countdown.verify(c, "<answer>1 + 1</answer>") == 0.1  # well formed, wrong numbers
    assert countdown.verify(c, "<answer>__import__('os')</answer>") == 0.1 and countdown.verify(c, "no") == 0.0
    assert evaluate_expression("(3 + 4) * 2") == (14, [3, 4, 2]) and evaluate_expression("2 ** 8") is None
    assert (
        overlong_penalty(10, 64, 16) == 0
        and overlong_penalty(56, 64, 16) == -0.5
        and overlong_penalty(64, 64, 16) == -1
    )
    assert load_reward("nanoseek.rl.rewards.format_reward") is format_reward
    with pytest.raises(ValueError, match="cannot load"):
        load_reward("nanoseek.rl.rewards.nothing")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")


def test_file_tasks_split_by_hash(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(f'{{"prompt": "What is {i} squared?", "answer": "{i * i}"}}\n' for i in range(200)))
    task = FileTask(path=str(path))
    test = task.problems("test", 5)
    assert all(task.verify(p, f"<answer>{p.answer}</answer>") == 1.0 for p in test)
    assert not {p.question for p in test} & {p.question for p in task.problems("train", 100)}


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0 and pass_at_k(4, 4, 2) == 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)


def digit_reward(completion, problem, task) -> float:
    """A toy reward a random model can learn fast: the share of digits in the reply."""
    return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


def test_beta_zero_builds_no_reference_and_a_short_run_raises_the_reward(tmp_path, tokenizer):
    from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer

    model = make_model_dir(tmp_path / "model", tokenizer)
    cfg = GRPOConfig(
        model=str(model),
        out=str(tmp_path / "run"),
        steps=20,
        prompts_per_step=4,
        group_size=8,
        max_tokens=8,
        lr=3e-3,
        warmup_steps=0,
        rewards="test_grpo.digit_reward",
        eval_n=0,
        save_every=20,
        progress=False,
    )
    trainer = GRPOTrainer(cfg)
    assert trainer.reference is None
    history = trainer.fit()
    first, last = (sum(m["reward"] for m in part) / len(part) for part in (history[:3], history[-3:]))
    assert last > 3 * first and last > first + 0.1, (first, last)
    for name in (
        "reward_std",
        "rewards/digit_reward/mean",
        "frac_reward_zero_std",
        "kl",
        "clip_ratio",
        "completions/mean_length",
        "entropy",
        "rollout_tokens_per_s",
    ):
        assert name in history[-1]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    from nanoseek.plots import plot_run

    assert [p.name for p in plot_run(tmp_path / "run")] == ["reward.png"]
    with_kl = GRPOTrainer(
        GRPOConfig(model=str(model), out=str(tmp_path / "kl"), beta=0.04, steps=1, eval_n=0, progress=False)
    )
    assert with_kl.reference is not None and not any(p.requires_grad for p in with_kl.reference.parameters())


def test_a_grpo_run_resumes_from_its_last_checkpoint(tmp_path, tokenizer):
    from nanoseek.checkpoint import CheckpointError
    from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer

    model = make_model_dir(tmp_path / "model", tokenizer)
    options = dict(
        model=str(model),
        out=str(tmp_path / "run"),
        prompts_per_step=2,
        group_size=2,
        max_tokens=4,
        eval_n=0,
        save_every=1,
        progress=False,
        rewards="test_grpo.digit_reward",
    )
    GRPOTrainer(GRPOConfig(steps=2, **options)).fit()
    with pytest.raises(CheckpointError, match="--resume"):
        GRPOTrainer(GRPOConfig(steps=3, **options)).fit()
    log = tmp_path / "run" / "rollouts.jsonl"  # every rollout, kept for inspection
    with open(log, "a") as f:  # a step logged by a run killed after it, before its checkpoint
        f.write(json.dumps({"step": 3, "lost": True}) + "\n")
    resumed = GRPOTrainer(GRPOConfig(steps=3, resume=True, **options))
    history = resumed.fit()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4 and not any("lost" in r for r in rows)
    assert [m["step"] for m in history] == [3]
    assert [m["step"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())] == [
        1,
        2,
        3,
    ]
    # The same run-folder lifecycle as the trainer's (train/run.py): other settings cannot resume it.
    with pytest.raises(CheckpointError, match="--prompts-per-step 2 \\(now 3\\)"):
        GRPOTrainer(GRPOConfig(steps=4, resume=True, **(options | {"prompts_per_step": 3}))).fit()
    saved = json.loads((tmp_path / "run" / "grpo_config.json").read_text())
    assert saved["steps"] == 3 and not list((tmp_path / "run").glob("*.tmp"))
