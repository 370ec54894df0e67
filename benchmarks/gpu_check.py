"""The CUDA paths CI can never run, checked and timed on one GPU in a few minutes; one JSON file out.

    bash benchmarks/gpu_check.sh [OUT.json]        # or: python benchmarks/gpu_check.py --out OUT.json

1. FP8 training (nanoseek.fp8: torch._scaled_mm per 128-wide K block) against bf16 autocast: the same
   20 steps from the same weights and batches, final losses and ms per step.
2. FP8-resident weights (Engine(weights="fp8"): W8A8 through _scaled_mm) against the same checkpoint
   dequantised to bf16: greedy agreement and decode tokens/s.
3. The captured decode step (torch.compile per batch bucket) against eager: greedy agreement, tokens/s.
4. Prefill and decode tokens/s of the small preset at batch 1 and 16.
Each check records its error instead of stopping the others.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from nanoseek import Engine, SamplingParams, Transformer, get_preset
from nanoseek.checkpoint import save_pretrained


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def fp8_training(steps: int = 20) -> dict:
    from nanoseek.fp8 import convert_to_fp8

    cfg = get_preset("small").replace(num_nextn_predict_layers=0)
    torch.manual_seed(0)
    base = Transformer(cfg).cuda()
    batches = [torch.randint(0, cfg.vocab_size, (8, 513), device="cuda") for _ in range(steps)]
    out = {}
    for name in ("bf16", "fp8"):
        model = Transformer(cfg).cuda()
        model.load_state_dict(base.state_dict())
        if name == "fp8":
            convert_to_fp8(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(batch, model=model, opt=opt):
            with torch.autocast("cuda", torch.bfloat16):
                logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        losses, times = [], []
        for batch in batches:
            times.append(timed(lambda b=batch, s=step, got=losses: got.append(s(b))))
        out[name] = {"final_loss": losses[-1], "ms_per_step": 1e3 * sorted(times[2:])[len(times[2:]) // 2]}
    out["loss_ratio_fp8_over_bf16"] = out["fp8"]["final_loss"] / out["bf16"]["final_loss"]
    return out


def decode_rate(engine: Engine, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    engine.generate(prompts, params)  # warm-up (and any compilation)
    outs = []
    seconds = timed(lambda: outs.extend(engine.generate(prompts, params)))
    return len(prompts) * n / seconds, [o.token_ids for o in outs]


def engines_compared(folder: Path, a: dict, b: dict, batches=(1, 16), n: int = 64) -> dict:
    cfg = get_preset("small")
    gen = torch.Generator().manual_seed(0)
    out = {}
    first, second = Engine(folder, device="cuda", **a), Engine(folder, device="cuda", **b)
    for batch in batches:
        prompts = torch.randint(0, cfg.vocab_size, (batch, 16), generator=gen).tolist()
        rate_a, tokens_a = decode_rate(first, prompts, n)
        rate_b, tokens_b = decode_rate(second, prompts, n)
        same = sum(x == y for ta, tb in zip(tokens_a, tokens_b, strict=True) for x, y in zip(ta, tb, strict=True))
        out[f"b{batch}"] = {
            "tokens_per_s": [rate_a, rate_b],
            "ratio": rate_b / rate_a,
            "greedy_agreement": same / (batch * n),
        }
    return out


def prefill_and_decode(folder: Path) -> dict:
    engine = Engine(folder, device="cuda", dtype=torch.bfloat16, max_batched_tokens=4096)
    prompt = torch.randint(0, 16384, (1, 2048)).tolist()
    params = SamplingParams(max_tokens=1, temperature=0)
    engine.generate(prompt, params)
    prefill = timed(lambda: engine.generate(torch.randint(0, 16384, (1, 2048)).tolist(), params))
    rate, _ = decode_rate(engine, torch.randint(0, 16384, (16, 16)).tolist(), 128)
    return {"prefill_tokens_per_s_2048": 2048 / prefill, "decode_tokens_per_s_b16": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for a GPU machine")
    report = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Transformer(get_preset("small"))
        fp8_dir, bf16_dir = Path(tmp) / "fp8", Path(tmp) / "bf16"
        save_pretrained(model, fp8_dir, fp8=True)
        save_pretrained(model.to(torch.bfloat16), bf16_dir)
        checks = {
            "fp8_training": fp8_training,
            "fp8_resident_vs_bf16": lambda: engines_compared(fp8_dir, {"weights": "bf16"}, {"weights": "fp8"}),
            "captured_vs_eager": lambda: engines_compared(
                bf16_dir, {"dtype": torch.bfloat16}, {"dtype": torch.bfloat16, "enforce_eager": False}
            ),
            "prefill_and_decode": lambda: prefill_and_decode(bf16_dir),
        }
        for name, check in checks.items():
            start = time.perf_counter()
            try:
                report[name] = check()
            except Exception:
                report[name] = {"error": traceback.format_exc(limit=3)}
            report[name]["seconds"] = time.perf_counter() - start
            print(name, json.dumps(report[name]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
