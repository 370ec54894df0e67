"""Pipeline parallelism (nanoseek/train/pipeline.py): the layout, the stages against the whole model in one
process, and real torchrun runs (gloo, CPU) against one process on the same global batch.

Tolerances: the pipeline adds the micro-batches' gradients in another order than one process does (and, with
FSDP, across ranks), so runs agree to float32 rounding: 1e-4 relative on losses, 1e-4 on the first step's
gradient norm (both runs hold the same weights then). Later gradient norms are not compared: Adam's first
update is nearly sign(gradient), so a gradient element at rounding level may flip and move the norm by a
percent without any loss moving more than 1e-5.
"""

import json
import os
import subprocess
from contextlib import nullcontext
from itertools import pairwise

import pytest
import torch
from test_parallel import NANOSEEK, TORCHRUN, TORCHRUN4, _train

from nanoseek import Transformer, get_preset
from nanoseek.config import IGNORE
from nanoseek.train.config import PP_SCHEDULES, TrainConfig
from nanoseek.train.pipeline import (
    SCHEDULES,
    StageModule,
    StageSpec,
    block_costs,
    check_supported,
    default_microbatches,
    plan,
    split_layers,
    stage_rank,
)

REL = 1e-4


# --- the layout (no processes) ----------------------------------------------------------------------
def test_the_schedule_table_is_the_flags_choices():
    assert tuple(SCHEDULES) == PP_SCHEDULES


def test_layers_split_to_make_the_busiest_stage_as_light_as_can_be():
    assert split_layers([1.0] * 4, 2, 1.0) == [range(0, 3), range(3, 4)]  # 3 | 1 + the head: 3 and 2
    assert split_layers([1.0] * 4, 2, 0.0) == [range(0, 2), range(2, 4)]
    assert split_layers([4.0, 1.0, 1.0, 1.0], 2, 1.0) == [range(0, 1), range(1, 4)]  # a heavy first layer
    assert split_layers([1.0] * 4, 4, 10.0) == [range(0, 1), range(1, 2), range(2, 4), range(4, 4)]
    assert split_layers([1.0] * 2, 4, 0.0) is None  # too few layers for the stages before the last


def test_the_head_and_mtp_module_weigh_on_the_last_stage():
    tiny = get_preset("tiny")  # a 4096 x 128 head costs about three decoder layers
    costs, last = block_costs(tiny, 256, 1)
    assert 5 < last / costs[-1] < 10
    assert split_layers(costs, 2, last) == [range(0, 4), range(4, 4)]  # measured: 0.55 s against 0.53 s
    v3 = get_preset("v3-671b")  # 61 layers + 1 MTP module on 16 ranks x 2 stages
    costs, last = block_costs(v3, 4096, 1)
    stages = split_layers(costs, 32, last)
    assert [len(r) for r in stages].count(0) == 1 and len(stages[-1]) == 0  # the heads fill the last stage
    assert stages[0].start == 0 and stages[-1].stop == 61 and all(a.stop == b.start for a, b in pairwise(stages))


def test_v_shape_puts_the_first_and_last_stage_on_rank_0():
    assert [stage_rank(s, 2, "v") for s in range(4)] == [0, 1, 1, 0]
    assert [stage_rank(s, 4, "v") for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert [stage_rank(s, 2, "loop") for s in range(4)] == [0, 1, 0, 1]


def test_micro_batches_default_to_two_per_stage():
    assert default_microbatches(16, 4) == 8
    assert default_microbatches(12, 4) == 12  # no divisor of 12 in [8, 12) but 12 itself
    assert default_microbatches(4, 4) == 4  # too few rows for two per stage: one row each


def test_plans_that_cannot_run_are_refused_at_start():
    tiny = get_preset("tiny")
    cfg = TrainConfig(pp=2, batch_size=8, pp_schedule="dualpipev")
    layout = plan(cfg, tiny, replicas=1, mtp_depths=1)
    assert [s.rank for s in layout.stages] == [0, 1, 1, 0] and layout.microbatches == 8
    assert "stage 3 on pp rank 0: norm + head + 1 MTP" in layout.describe()
    with pytest.raises(ValueError, match="at least one micro-batch per stage"):
        plan(TrainConfig(pp=2, batch_size=4, micro_batch_size=2), tiny, replicas=1, mtp_depths=1)
    with pytest.raises(ValueError, match="more than the model's 4 decoder layers"):
        plan(TrainConfig(pp=4, batch_size=16), tiny, replicas=1, mtp_depths=1)
    with pytest.raises(ValueError, match="--compile"):
        check_supported(TrainConfig(pp=2, compile=True), tiny)
    with pytest.raises(ValueError, match="--kl-weight"):
        check_supported(TrainConfig(pp=2, kl_weight=1.0, teacher="t"), tiny)
    with pytest.raises(ValueError, match="untied"):
        check_supported(TrainConfig(pp=2), tiny.replace(tie_word_embeddings=True))


def test_stages_chained_in_one_process_give_the_models_losses_and_gradients():
    """Three stages over the model's own modules: the same summed losses, and with the balance loss attached
    to each stage's output (_AttachAux), the same gradients as the whole model's loss."""
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(vocab_size=256)
    model = Transformer(cfg).train()
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    y[0, :5] = IGNORE
    alpha, lam = 0.1, 0.3  # a large alpha: the balance term's gradient must show

    def loss_of(sums: torch.Tensor) -> torch.Tensor:
        counts = torch.stack([(y[:, k:] != IGNORE).sum() for k in range(2)]).float()
        per_head = sums / counts
        return per_head[0] + lam * per_head[1:].mean()

    sums = model(x, mtp=True, targets=y)
    balance = torch.stack([m.balance_loss for _, m in model.moe_layers()]).sum()
    (loss_of(sums) + alpha * balance).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    specs = [StageSpec(0, 0, range(0, 2), True, False), StageSpec(1, 1, range(2, 3), False, False)]
    specs.append(StageSpec(2, 0, range(3, 4), False, True))
    stages = [StageModule(model, s, depths=1, balance=(alpha, 1), autocast=nullcontext) for s in specs]
    acts = stages[0](x)
    acts = stages[1](*acts)
    pp_sums = stages[2](*acts, targets=y)
    loss_of(pp_sums).backward()
    torch.testing.assert_close(pp_sums, sums.detach(), rtol=1e-6, atol=1e-6)
    assert {n for n, _ in stages[1].named_parameters()} <= set(expected)  # the model's own names
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-8, msg=name)
    assert sum(s.balance for s in stages).item() == pytest.approx(balance.item(), rel=1e-6)


# --- real processes --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir):
    """The 1-process run every layout is compared with: 3 steps, global batch 4 x 32 tokens, float32."""
    return _train([], tmp_path_factory.mktemp("one"), data_dir, NANOSEEK, steps=3)


def assert_same_run(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], rel=REL), key
    assert got[0]["grad_norm"] == pytest.approx(want[0]["grad_norm"], rel=REL)
    assert got[0]["max_over_mean_load"] == pytest.approx(want[0]["max_over_mean_load"], rel=1e-6)
    if want[-1]["val_loss"] is not None:
        assert got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], rel=REL)


@pytest.mark.parametrize("schedule", PP_SCHEDULES)
def test_pp2_matches_one_process(tmp_path, data_dir, one_process, schedule):
    """2 ranks, 2 stages (1f1b, gpipe) or 4 (the others: V-shaped or round-robin), 4 micro-batches of 1."""
    pp = _train(["--pp", "2", "--pp-schedule", schedule], tmp_path / schedule, data_dir, TORCHRUN, steps=3)
    assert_same_run(pp, one_process)
    stages = 2 if SCHEDULES[schedule].stages_per_rank == 1 else 4
    for m in pp:
        assert 0 <= m["bubble_fraction"] < 1 and len(m["stage_compute_s"]) == stages
        assert m["tokens"] == 4 * 32 * m["step"]  # the pipeline's ranks read the same rows: counted once


def test_pp_checkpoints_resume_with_one_process_and_back(tmp_path, data_dir):
    straight = _train([], tmp_path / "straight", data_dir, NANOSEEK, steps=4)
    _train(["--pp", "2"], tmp_path / "pp_then_one", data_dir, TORCHRUN, steps=2)
    resumed = _train([], tmp_path / "pp_then_one", data_dir, NANOSEEK, steps=4, resume=True)
    _train([], tmp_path / "one_then_pp", data_dir, NANOSEEK, steps=2)
    resumed_pp = _train(["--pp", "2", "--pp-schedule", "1f1b"], tmp_path / "one_then_pp", data_dir, TORCHRUN, 4, True)
    for run in (resumed, resumed_pp):
        assert [m["step"] for m in run] == [1, 2, 3, 4]
        assert [m["loss"] for m in run] == pytest.approx([m["loss"] for m in straight], rel=REL)


def test_pp2_with_fsdp_and_ep2_on_four_ranks_matches_one_process(tmp_path, data_dir):
    """pp=2 x (dp=1, ep=2): each stage sharded with FSDP2 over its 2 replicas, its experts split over them;
    DualPipeV's split backward (input, then weight gradients) under FSDP2."""
    one = _train(["--batch-size", "8"], tmp_path / "one", data_dir, NANOSEEK, steps=3)
    four = _train(["--batch-size", "8", "--pp", "2", "--ep", "2"], tmp_path / "four", data_dir, TORCHRUN4, steps=3)
    assert_same_run(four, one)


def test_sft_runs_under_pp(tmp_path, tokenizer):
    """`nanoseek sft --pp 2` (the same trainer): chat rows with few trained tokens, the same losses."""
    from serving import make_model_dir

    model = make_model_dir(tmp_path / "base", tokenizer, layers=4)
    with open(tmp_path / "chat.jsonl", "w") as f:
        for i in range(40):
            reply = {"role": "assistant", "content": f"{i} " * (1 + i % 5)}
            messages = [{"role": "user", "content": f"say {i}"}, reply]
            f.write(json.dumps({"messages": messages}) + "\n")
    flags = "--steps 2 --batch-size 4 --seq-len 48 --no-progress --sample-tokens 0 --dtype float32 --save-every 100"
    args = ["sft", "--model", str(model), "--data", str(tmp_path / "chat.jsonl"), *flags.split()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for launcher, extra, out in ((NANOSEEK, [], "one"), (TORCHRUN, ["--pp", "2"], "pp")):
        cmd = [*launcher, *args, *extra, "--out", str(tmp_path / out)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append([json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()])
    assert_same_run(runs[1], runs[0])


def test_pp_without_enough_processes_says_how_to_launch(tmp_path, data_dir):
    cmd = [*NANOSEEK, "train", "--data", str(data_dir), "--out", str(tmp_path), "--pp", "2", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--pp 2 needs 2 or a multiple of 2 processes" in result.stderr
