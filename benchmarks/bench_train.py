"""Training throughput: nanoseek's trainer step against transformers' DeepseekV3 on the same config and batch.

    python benchmarks/bench_train.py [--preset tiny] [--batch-size 16] [--seq-len 256] [--iters 8] [--compile]

nanoseek's step is the real `Trainer.train_step` (losses, balance loss, clipping, AdamW, bias update);
transformers' is `model(input_ids, labels=...)`, backward, clipping and AdamW. MTP is off in the
comparison (transformers does not train it); the "nanoseek + MTP" row shows what the extra depth costs.
One process, alternating iterations; the ratio is what to read. --compile runs nanoseek's steps under
torch.compile (TrainConfig.compile): the warm-up steps compile, about 90 s here cold, 10 s on a warm cache.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from bench_model import race

from nanoseek import get_preset
from nanoseek.device import cpu_features
from nanoseek.train.throughput import train_flops_per_token
from nanoseek.train.trainer import TrainConfig, Trainer


def hf_step(model, optimizer, window: torch.Tensor) -> None:
    loss = model(input_ids=window[:, :-1], labels=window[:, :-1]).loss  # transformers shifts the labels itself
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="torch.compile nanoseek's model (warm-up compiles)")
    args = parser.parse_args()
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    with tempfile.TemporaryDirectory() as out:
        common = dict(
            preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, progress=False, compile=args.compile
        )
        no_mtp = get_preset(args.preset).replace(num_nextn_predict_layers=0)
        ours = Trainer(TrainConfig(out=f"{out}/a", **common), no_mtp)
        with_mtp = Trainer(TrainConfig(out=f"{out}/b", **common))
        torch.manual_seed(0)
        hf_config = DeepseekV3Config(**ours.model.cfg.to_hf_dict())
        reference = DeepseekV3ForCausalLM._from_config(hf_config, attn_implementation="sdpa").to(ours.amp_dtype)
        hf_opt = torch.optim.AdamW(reference.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        window = ours.loader.next_batch()
        tokens = args.batch_size * args.seq_len
        print(cpu_features())
        print(
            f"preset {args.preset}, batch {args.batch_size} x {args.seq_len}, {ours.amp_dtype}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}"
        )
        times = race(
            {
                "nanoseek": ours.train_step,
                "nanoseek + MTP": with_mtp.train_step,
                "transformers": lambda: hf_step(reference, hf_opt, window),
            },
            args.iters,
        )
    for name, seconds in times.items():
        print(f"{name:16s} {tokens / seconds:8.0f} tok/s   {times['transformers'] / seconds:.2f}x transformers")
    # MTP's share of the step in time and in arithmetic (cost.py's count): equal shares mean the extra depth
    # runs as fast as the rest, and only a smaller head or block (a bigger model) makes it cheaper.
    cfg = get_preset(args.preset)
    flops = [train_flops_per_token(cfg, args.seq_len, mtp=m) for m in (False, True)]
    time_share = 1 - times["nanoseek"] / times["nanoseek + MTP"]
    print(f"MTP: {time_share:.0%} of the step's time, {1 - flops[0] / flops[1]:.0%} of its FLOPs")


if __name__ == "__main__":
    main()
