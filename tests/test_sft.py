"""Supervised fine-tuning: assistant-only loss masks, padded chat batches, the trainer from a model folder,
logit distillation's KL, and the sft / task / eval / distill commands end to end."""

import json

import pytest
import torch
from serving import make_model_dir

from nanoseek.cli import main
from nanoseek.data import IGNORE, ChatLoader, encode_chat
from nanoseek.train.trainer import TrainConfig, Trainer, distillation_kl

pytestmark = pytest.mark.auto_dtype  # CI runs this module again with the other CPU kind's auto dtype

CHAT = [
    {"role": "system", "content": "You add."},
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>2+2</think><answer>4</answer>"},
]


def test_only_assistant_replies_and_their_end_token_are_trained(tokenizer):
    ids, trained = encode_chat(tokenizer, CHAT)
    assert ids == tokenizer.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)
    learnt = [i for i, t in zip(ids, trained, strict=True) if t]
    replies = [*tokenizer.encode("2"), tokenizer.eos_id, *tokenizer.encode("<think>2+2</think><answer>4</answer>")]
    assert learnt == [*replies, tokenizer.eos_id]
    assert tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if not t]).count("1+1?") == 1


def test_tool_use_conversations_train_the_calls_and_the_answer_not_the_tool_results(tmp_path, tokenizer):
    """`nanoseek task write --task multiply --solutions --tools calculator` writes DeepSeek-V3 tool-use
    conversations; the calls (special tokens, name and arguments) and the final answer are trained, the
    results are not. Without --tools the same problems are worked out in the chain of thought."""
    out = tmp_path / "calc.jsonl"
    write = ["task", "write", "--task", "multiply", "--n", "40", "--solutions", "--out"]
    assert main([*write, str(out), "--tools", "calculator"]) == 0
    row = json.loads(out.read_text().splitlines()[0])
    [call] = row["messages"][1]["tool_calls"]
    expression = json.loads(call["function"]["arguments"])["expression"]
    assert row["tools"][0]["function"]["name"] == "calculator" == call["function"]["name"]
    assert row["messages"][2] == {"role": "tool", "tool_call_id": "call_0", "content": str(eval(expression))}
    ids, trained = encode_chat(tokenizer, row["messages"], row["tools"])
    assert ids == tokenizer.apply_chat_template(
        row["messages"], add_generation_prompt=False, tokenize=True, tools=row["tools"]
    )
    learnt = tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if t])
    assert learnt.startswith("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>calculator\n```json\n")
    assert f"<answer>{eval(expression)}</answer>" in learnt and "<｜tool▁output▁begin｜>" not in learnt
    assert "## Tools" in tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if not t])
    loader = ChatLoader(out, tokenizer, "train", 4, 1024)  # the tools prompt is long in a 512-token vocabulary
    assert loader.n_windows >= 30
    assert main([*write, str(tmp_path / "worked.jsonl")]) == 0
    worked = json.loads((tmp_path / "worked.jsonl").read_text().splitlines()[0])
    assert "tools" not in worked and worked["messages"][1]["content"].startswith("<think>")
    assert worked["messages"][0] == row["messages"][0]  # the same problems
    arithmetic = ["task", "write", "--task", "arithmetic", "--n", "4", "--solutions", "--out", str(out)]
    assert main([*arithmetic, "--tools", "calculator"]) == 2  # its solutions call no tools


def write_chats(path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"say {i}"},
                {"role": "assistant", "content": f"{i} " * (1 + i % 5)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def test_chat_batches_pad_mask_split_and_resume(tmp_path, tokenizer):
    write_chats(tmp_path / "chat.jsonl", 100)
    train = ChatLoader(tmp_path / "chat.jsonl", tokenizer, "train", 8, 64, seed=1)
    val = ChatLoader(tmp_path / "chat.jsonl", tokenizer, "val", 1, 64)
    assert train.n_windows + val.n_windows == 100 and val.n_windows >= 1
    ids, labels = train.next_batch()
    assert ids.shape == labels.shape and ids.shape[0] == 8
    padded = ids == tokenizer.pad_id
    assert (labels[padded] == IGNORE).all()
    assert ((labels == ids) | (labels == IGNORE)).all() and (labels != IGNORE).sum(1).min() > 0
    state = train.state_dict()
    expected = train.next_batch()
    again = ChatLoader(tmp_path / "chat.jsonl", tokenizer, "train", 8, 64, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), expected, strict=True))
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        ChatLoader(tmp_path / "bad.jsonl", tokenizer, "train", 1, 64)


def test_sft_from_a_model_folder_learns_the_replies(tmp_path, tokenizer):
    model = make_model_dir(tmp_path / "base", tokenizer)
    write_chats(tmp_path / "chat.jsonl", 64)
    cfg = TrainConfig(
        init=str(model),
        data=str(tmp_path / "chat.jsonl"),
        objective="sft",
        out=str(tmp_path / "run"),
        steps=30,
        batch_size=8,
        seq_len=64,
        lr=3e-3,
        warmup_steps=2,
        eval_every=30,
        save_every=30,
        sample_tokens=4,
        progress=False,
        mtp_lambda=0,
    )
    history = Trainer(cfg).fit()
    assert history[-1]["lm_loss"] < 0.6 * history[0]["lm_loss"]
    assert history[-1]["val_loss"] is not None and (tmp_path / "run" / "model" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="needs --model"):
        TrainConfig(objective="sft", data="x.jsonl")


def sft_step(model_dir, data, out, **changes) -> tuple[dict, torch.Tensor]:
    """The metrics and flattened gradients of one SFT step in fp32, the optimizer left untouched."""
    torch.manual_seed(0)
    cfg = TrainConfig(
        init=str(model_dir),
        data=str(data),
        objective="sft",
        out=str(out),
        steps=1,
        batch_size=4,
        seq_len=48,
        progress=False,
        sample_tokens=0,
        balance_alpha=0.0,
        dtype="float32",
        **changes,
    )
    trainer = Trainer(cfg)
    grads = []
    trainer.optimizer.step = lambda: grads.extend(p.grad.flatten().clone() for p in trainer.model.parameters())
    return trainer.train_step(), torch.cat(grads)


def test_sft_loss_and_gradients_do_not_depend_on_the_micro_batch_size(tmp_path, tokenizer):
    """Rows train 1 to 5 reply tokens: every trained token weighs the same whatever the split (the step's
    token count divides the summed token losses once), for the main head and each MTP depth."""
    model = make_model_dir(tmp_path / "base", tokenizer)
    write_chats(tmp_path / "chat.jsonl", 40)
    full, grads = sft_step(model, tmp_path / "chat.jsonl", tmp_path / "full")
    split, grads_split = sft_step(model, tmp_path / "chat.jsonl", tmp_path / "split", micro_batch_size=1)
    for name in ("loss", "lm_loss", "mtp_loss"):
        assert split[name] == pytest.approx(full[name], rel=1e-5), name
    torch.testing.assert_close(grads_split, grads, rtol=1e-4, atol=1e-7)


def test_distillation_kl_is_zero_for_the_teacher_itself_and_counts_trained_tokens_only():
    student, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    targets = torch.tensor([[1, IGNORE, 2], [IGNORE, IGNORE, 3]])
    assert distillation_kl(teacher, teacher, targets).item() == pytest.approx(0, abs=1e-6)
    kl = distillation_kl(student, teacher, targets)
    changed = student.clone()
    changed[0, 1] += 5  # an untrained position
    assert kl > 0 and distillation_kl(changed, teacher, targets).item() == pytest.approx(kl.item())


def test_task_sft_eval_and_distill_commands(tmp_path, tokenizer, capsys):
    model = make_model_dir(tmp_path / "base", tokenizer)
    assert (
        main(["task", "write", "--task", "arithmetic", "--n", "40", "--solutions", "--out", str(tmp_path / "s.jsonl")])
        == 0
    )
    sft = ["sft", "--model", str(model), "--data", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "sft")]
    assert (
        main([*sft, "--steps", "2", "--batch-size", "4", "--seq-len", "96", "--no-progress", "--sample-tokens", "0"])
        == 0
    )
    flags = "--task arithmetic --n 4 --max-tokens 8 --json"
    assert main(["eval", "--model", str(tmp_path / "sft" / "model"), *flags.split()]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and 0 <= result["pass@1"] <= 1
    assert main(["task", "write", "--task", "arithmetic", "--n", "8", "--out", str(tmp_path / "p.jsonl")]) == 0
    # No verifier: every first teacher reply is kept, so the student has traces to learn from.
    flags = "--samples 1 --max-tokens 8 --batch-size 4 --seq-len 96 --no-progress --sample-tokens 0 --kl-weight 0.5"
    distill = ["distill", "--teacher", str(model), "--student", str(model), *flags.split()]
    distill += ["--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "d")]
    assert main([*distill, "--steps", "1"]) == 0
    traces = tmp_path / "d" / "traces.jsonl"
    assert len(lines := traces.read_text().splitlines()) == 8
    assert json.loads(lines[0])["messages"][-1]["role"] == "assistant"
    assert "kl_loss" in json.loads((tmp_path / "d" / "metrics.jsonl").read_text().splitlines()[-1])
    # A resumed distillation reuses the traces it wrote and trains on from its checkpoint.
    written = traces.stat().st_mtime_ns
    assert main([*distill, "--steps", "2", "--resume"]) == 0
    assert traces.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "d" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
