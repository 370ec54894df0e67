"""The trainer: it learns, balances experts, shifts MTP targets right, and resumes exactly.

Tests that check an equivalence (resume vs straight, accumulation vs full batch) state float32; the others
take the hardware's `auto` dtype (bf16 autocast on CPUs with AMX), and bf16 is tested on purpose below.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek import CheckpointError, Transformer, get_preset
from nanoseek.model.moe import BalancingHook, Gate, sequence_balance_loss, update_balancing_bias
from nanoseek.train.trainer import TrainConfig, Trainer, mtp_targets

pytestmark = pytest.mark.auto_dtype  # CI runs this module again with the other CPU kind's auto dtype

SMALL = get_preset("tiny").replace(num_hidden_layers=2, num_nextn_predict_layers=1)


def make_trainer(data_dir, out, **changes) -> Trainer:
    defaults = dict(
        out=str(out),
        data=str(data_dir),
        steps=4,
        batch_size=4,
        seq_len=32,
        warmup_steps=2,
        eval_every=2,
        save_every=2,
        sample_tokens=4,
        progress=False,
    )
    return Trainer(TrainConfig(**(defaults | changes)), model_cfg=SMALL)


def test_a_few_steps_fit_a_fixed_batch(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, lr=3e-3)
    window = trainer.loader.next_batch()
    losses = []
    for _ in range(25):
        parts = trainer.compute_loss(*trainer.inputs_and_targets(window))
        parts["loss"].backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(parts["lm_loss"].item())
    assert losses[-1] < 0.6 * losses[0]


def test_bias_update_moves_overloaded_experts_down_and_idle_ones_up():
    gate = Gate(get_preset("tiny"))  # 8 experts
    load = torch.tensor([40.0, 0.0, 10.0, 10.0, 10.0, 10.0, 0.0, 0.0])  # mean 10
    update_balancing_bias(gate, load, gamma=1e-3)
    expected = torch.tensor([-1e-3, 1e-3, 0.0, 0.0, 0.0, 0.0, 1e-3, 1e-3])
    torch.testing.assert_close(gate.e_score_correction_bias, expected)


def test_the_balancing_hook_moves_the_biases_once_per_optimizer_step_with_the_loads_handed_over():
    """The bias update rides on the optimizer's step (a post-step hook): the loads of the step move each named
    gate once, after the weights moved; a step with no loads handed over moves nothing; the router's weights
    are the optimizer's, the bias never is."""
    gates = {"model.layers.1": Gate(get_preset("tiny")), "model.layers.2": Gate(get_preset("tiny"))}
    optimizer = torch.optim.SGD([g.weight for g in gates.values()], lr=0.1)
    hook = BalancingHook(optimizer, gates, gamma=1e-3)
    hook.loads = {"model.layers.1": torch.tensor([40.0, 0.0, 10.0, 10.0, 10.0, 10.0, 0.0, 0.0])}
    for g in gates.values():
        torch.nn.init.normal_(g.weight)  # Gate allocates its weight uninitialised: garbage may hold a NaN
        g.weight.grad = torch.ones_like(g.weight)
    weight_before = gates["model.layers.1"].weight.detach().clone()
    optimizer.step()
    expected = torch.tensor([-1e-3, 1e-3, 0.0, 0.0, 0.0, 0.0, 1e-3, 1e-3])
    torch.testing.assert_close(gates["model.layers.1"].e_score_correction_bias, expected)
    torch.testing.assert_close(gates["model.layers.1"].weight, weight_before - 0.1)
    assert not gates["model.layers.2"].e_score_correction_bias.any()  # no loads for it
    optimizer.step()  # the loads were spent
    torch.testing.assert_close(gates["model.layers.1"].e_score_correction_bias, expected)


def test_sequence_balance_loss_by_hand():
    cfg = get_preset("tiny").replace(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2)
    logit = torch.logit(torch.tensor([0.8, 0.4, 0.4, 0.4]))
    logits = torch.stack([torch.zeros(2, 4), logit.expand(2, 4)])  # [B=2, T=2, E=4]
    indices = torch.tensor([[[0, 1], [0, 2]], [[0, 1], [0, 1]]])
    # Sequence 0: P = 1/4 each, f = [2, 1, 1, 0] * 4 / (2 * 2)   -> sum f P = 1.0
    # Sequence 1: P = [.4, .2, .2, .2], f = [2, 2, 0, 0]          -> sum f P = 1.2
    loss = sequence_balance_loss(logits, indices, cfg)
    assert loss.item() == pytest.approx(1.1, rel=1e-6)


def test_mtp_targets_are_shifted_by_depth():
    targets = torch.tensor([[11, 12, 13, 14, 15]])  # next-token targets of inputs t0..t4
    assert mtp_targets(targets, 1).tolist() == [[12, 13, 14, 15]]
    assert mtp_targets(targets, 2).tolist() == [[13, 14, 15]]


def test_mtp_depth_one_at_position_i_sees_token_i_plus_one_and_nothing_later():
    model = Transformer(SMALL.replace(vocab_size=64)).eval()
    x = torch.randint(0, 64, (1, 10))
    y = x.clone()
    y[0, 6] = (x[0, 6] + 1) % 64  # change token 6
    with torch.no_grad():
        (_, (a,)), (_, (b,)) = model(x, mtp=True), model(y, mtp=True)
    assert a.shape == (1, 9, 64)
    torch.testing.assert_close(a[0, :5], b[0, :5], rtol=0, atol=1e-6)  # positions 0..4 see tokens 0..5 only
    assert not torch.allclose(a[0, 5], b[0, 5])  # position 5 embeds token 6 to predict token 7


def test_bf16_autocast_step_runs_and_keeps_fp32_masters(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, dtype="bfloat16")
    metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_softmax_gate_trains_without_a_bias(data_dir, tmp_path):
    trainer = Trainer(
        TrainConfig(out=str(tmp_path), data=str(data_dir), steps=1, batch_size=2, seq_len=16, progress=False),
        model_cfg=SMALL.replace(scoring_func="softmax"),
    )
    assert trainer.train_step()["loss"] > 0


def test_resume_refuses_a_different_data_stream(data_dir, tmp_path):
    make_trainer(data_dir, tmp_path, steps=2).fit()
    with pytest.raises(CheckpointError, match=r"--batch-size 4 \(now 2\)"):
        make_trainer(data_dir, tmp_path, steps=4, batch_size=2, resume=True).fit()


def test_training_run_writes_metrics_model_and_plots(data_dir, tmp_path):
    history = make_trainer(data_dir, tmp_path).fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4] == [m["step"] for m in history]
    keys = {"loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens_per_s", "max_over_mean_load"}
    assert keys <= lines[0].keys() and lines[1]["val_loss"] > 0 and "val_loss" not in lines[0]
    assert set(lines[0]["max_over_mean_load"]) == {"layers.1", "mtp.0.block"}
    assert lines[0]["mtp_loss"] > 0
    # The exported model folder loads in nanoseek and in transformers, tokenizer included.
    model = nanoseek.from_pretrained(tmp_path / "model")
    assert model.cfg.vocab_size == 512 and len(model.mtp) == 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert AutoTokenizer.from_pretrained(tmp_path / "model").eos_token_id == 1
    from nanoseek.plots import plot_run

    assert {p.name for p in plot_run(tmp_path)} == {"loss.png", "expert_load.png"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


def test_resume_gives_the_same_losses_as_a_straight_run(data_dir, tmp_path):
    fp32 = dict(schedule="wsd", dtype="float32")
    straight = make_trainer(data_dir, tmp_path / "a", steps=6, **fp32).fit()
    make_trainer(data_dir, tmp_path / "b", steps=2, **fp32).fit()  # stop after 2 steps
    resumed = make_trainer(data_dir, tmp_path / "b", steps=6, resume=True, **fp32).fit()
    assert [m["step"] for m in resumed] == [3, 4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight[2:]]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_aux_free_bias_changes_only_with_gamma(data_dir, tmp_path):
    on = make_trainer(data_dir, tmp_path / "on", steps=2)
    on.fit()
    off = make_trainer(data_dir, tmp_path / "off", steps=2, bias_gamma=0.0)
    off.fit()
    assert on.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    assert off.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() == 0


def test_the_default_bias_rate_fits_the_run_length(data_dir, tmp_path):
    """V3's gamma (1e-3) over its ~250k steps; a short run raises it to 1.25 / steps (at most 0.005), so that
    its biases can travel as far as they must in the steps it has. One step moves each bias by exactly that
    rate (the sign rule)."""
    from nanoseek.model.moe import bias_gamma_for

    assert bias_gamma_for(500) == pytest.approx(2.5e-3) and bias_gamma_for(250_000) == 1e-3
    assert bias_gamma_for(250) == bias_gamma_for(4) == 0.005
    assert bias_gamma_for(350, init="runs/tiny/model") == 1e-3  # a fine-tune keeps its learnt routing
    trainer = make_trainer(data_dir, tmp_path, steps=4)
    assert trainer.bias_gamma == 0.005
    trainer.train_step()
    moved = trainer.model.layers[1].mlp.gate.e_score_correction_bias.abs()
    assert torch.allclose(moved[moved > 0], torch.tensor(0.005))


def test_corrupt_checkpoint_is_a_clear_error(data_dir, tmp_path):
    make_trainer(data_dir, tmp_path, steps=2).fit()
    weights = tmp_path / "checkpoints" / "step_000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its checksum"):
        make_trainer(data_dir, tmp_path, steps=4, resume=True).fit()


def test_missing_checkpoint_and_clobbering_are_clear_errors(data_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        make_trainer(data_dir, tmp_path, resume=True).fit()
    make_trainer(data_dir, tmp_path, steps=2).fit()
    with pytest.raises(CheckpointError, match="pass --resume"):
        make_trainer(data_dir, tmp_path, steps=2).fit()


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(data_dir, tmp_path):
    nanoseek_cli = str(Path(sys.executable).parent / "nanoseek")
    flags = "--steps 40 --batch-size 2 --seq-len 32 --save-every 2 --eval-every 100 --sample-tokens 0 --no-progress"
    args = [nanoseek_cli, "train", "--data", str(data_dir), "--out", str(tmp_path), *flags.split()]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.time() + 120
    while not (tmp_path / "checkpoints" / "step_000004").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run([*args, "--resume", "--steps", "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert (tmp_path / "model" / "model.safetensors").is_file()


BF16_EPS = 2**-8  # bf16 keeps 8 significant bits: one rounding moves a value by at most 2^-8 of it


def one_step(data_dir, out, **changes) -> tuple[float, torch.Tensor]:
    """The loss and the flattened gradients of the first training step, the optimizer left untouched."""
    torch.manual_seed(0)
    trainer = make_trainer(data_dir, out, balance_alpha=0.0, **changes)
    grads = []
    trainer.optimizer.step = lambda: grads.extend(p.grad.flatten().clone() for p in trainer.model.parameters())
    return trainer.train_step()["loss"], torch.cat(grads)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_gradient_accumulation_matches_the_full_batch(data_dir, tmp_path):
    loss, grads = one_step(data_dir, tmp_path / "full", dtype="float32")
    loss_acc, grads_acc = one_step(data_dir, tmp_path / "acc", dtype="float32", micro_batch_size=1)
    assert loss_acc == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(grads_acc, grads, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_stays_within_bf16_rounding_of_fp32(data_dir, tmp_path):
    """Every matmul rounds both operands to bf16 (at most BF16_EPS each). The loss is a mean over tokens,
    whose rounding errors average out: within one BF16_EPS. A gradient multiplies a forward and a
    backward operand, each rounded once per layer it crosses (2 here): within 4 BF16_EPS in norm."""
    loss32, grads32 = one_step(data_dir, tmp_path / "fp32", dtype="float32")
    loss16, grads16 = one_step(data_dir, tmp_path / "bf16", dtype="bfloat16")
    assert loss16 == pytest.approx(loss32, rel=BF16_EPS)
    assert relative(grads16, grads32) < 4 * BF16_EPS


def test_bf16_gradient_accumulation_matches_the_full_batch_to_bf16_rounding(data_dir, tmp_path):
    """The same bf16 roundings per row either way; only matmul reduction orders and the fp32 sums of the
    micro-batch gradients differ: the loss within one BF16_EPS, gradients within 2 in norm."""
    loss, grads = one_step(data_dir, tmp_path / "full", dtype="bfloat16")
    loss_acc, grads_acc = one_step(data_dir, tmp_path / "acc", dtype="bfloat16", micro_batch_size=1)
    assert loss_acc == pytest.approx(loss, rel=BF16_EPS)
    assert relative(grads_acc, grads) < 2 * BF16_EPS


def test_metrics_report_bits_per_byte_flops_and_mfu(tokenizer, tmp_path):
    """val_bpb is the validation loss per byte of text, in bits: the summed losses (nats) of the targets that
    carry text over the UTF-8 bytes they decode to (a special token's target has no bytes, and its loss is
    left out, as nanochat does); FLOP/s are the tokens/s times cost.py's FLOPs per token."""
    import math

    import torch.nn.functional as F

    from nanoseek.cost import flops_per_token
    from nanoseek.data import prepare

    docs = tmp_path / "docs"  # short documents, so that validation windows hold their EOS targets
    docs.mkdir()
    for i in range(200):
        (docs / f"d{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n")
    short = tmp_path / "data"
    prepare(sorted(docs.iterdir()), tokenizer, short, val_permille=500, progress=False, fim_rate=0.0)
    tokenizer.save(short / "tokenizer")
    trainer = make_trainer(short, tmp_path / "run", steps=2, eval_every=2, sample_tokens=0, peak_flops=1e12)
    metrics = trainer.fit()[-1]
    trainer.val_loader.load_state_dict({"epoch": 0, "cursor": 0})
    n = min(trainer.cfg.eval_batches, trainer.val_loader.n_windows // trainer.val_loader.batch_size)
    special = {t for t in range(trainer.tokenizer.vocab_size) if trainer.tokenizer.decode([t], True) == ""}
    loss_sum = text_bytes = 0.0
    saw_special = False
    for _ in range(n):
        inputs, targets = trainer.inputs_and_targets(trainer.val_loader.next_batch())
        with torch.no_grad():
            losses = F.cross_entropy(trainer.model(inputs).flatten(0, 1), targets.flatten(), reduction="none")
        text = torch.tensor([t not in special for t in targets.flatten().tolist()])
        saw_special |= not text.all()
        loss_sum += losses[text].sum().item()
        text_bytes += sum(
            len(trainer.tokenizer.decode(row.tolist(), skip_special_tokens=True).encode()) for row in targets
        )
    assert saw_special  # documents end in EOS: the case that matters
    expected = loss_sum / math.log(2) / text_bytes
    assert metrics["val_bpb"] == pytest.approx(expected, rel=0.02)  # windows cut characters at their edges
    per_token = flops_per_token(trainer.model.cfg, trainer.cfg.seq_len, training=True).total
    assert metrics["flops_per_s"] == pytest.approx(metrics["tokens_per_s"] * per_token)
    assert metrics["mfu"] == pytest.approx(metrics["flops_per_s"] / 1e12)
    assert metrics["peak_flops"] == metrics["peak_flops_dense"] == 1e12 and metrics["mfu_dense"] == metrics["mfu"]
