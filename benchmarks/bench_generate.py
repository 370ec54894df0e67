"""Decode throughput and KV-cache bytes: nanoseek's engine against transformers' `generate`, same model.

    python benchmarks/bench_generate.py [--preset tiny] [--new-tokens 128] [--long-prompt 2048]

Both run greedy decoding with the same weights in one process; nanoseek with its defaults (the decode step
captured with torch.compile, compiled in the warm-up) and eagerly (`enforce_eager=True`). Cases:
batch 1 and 16 with a short prompt and 128 new tokens, and batch 1 after a 2048-token prompt (decode
tokens/s there excludes the prefill, timed separately with one new token). Also prints the engine's
`auto` decode dtype against fp32 (never slower: bf16 only where a probe measured it faster), and the
KV-cache bytes per token of each against the MLA floor, (kv_lora_rank + qk_rope_head_dim) x layers x
element bytes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from nanoseek import Engine, SamplingParams, get_preset
from nanoseek.device import cpu_features, default_dtype


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--long-prompt", type=int, default=2048)
    args = parser.parse_args()
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    dtype = default_dtype("cpu")
    cfg = get_preset(args.preset).replace(num_nextn_predict_layers=0, max_position_embeddings=4096)
    torch.manual_seed(0)
    reference = DeepseekV3ForCausalLM._from_config(DeepseekV3Config(**cfg.to_hf_dict()), attn_implementation="sdpa")
    reference = reference.to(dtype).eval()
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        engine = Engine(
            tmp, device="cpu", dtype=dtype, cache_memory_mb=512, max_batched_tokens=4096, enforce_eager=True
        )
        captured = Engine(tmp, device="cpu", dtype=dtype, cache_memory_mb=512, max_batched_tokens=4096)
        # The engine's own `auto` decode dtype (a probe where the CPU has AMX), against fp32.
        auto = Engine(tmp, device="cpu", cache_memory_mb=512)
        fp32 = Engine(tmp, device="cpu", dtype=torch.float32, cache_memory_mb=512)
    n = args.new_tokens
    greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    print(cpu_features())
    print(f"preset {args.preset}, {dtype}, {torch.get_num_threads()} threads, greedy, {n} new tokens")

    def ours(prompts, max_tokens=n):
        engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))

    def ours_captured(prompts, max_tokens=n):
        captured.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))

    def theirs(prompts, max_tokens=n):
        with torch.no_grad():
            reference.generate(
                torch.tensor(prompts), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
            )

    gen = torch.Generator().manual_seed(0)

    def fresh(batch: int, length: int) -> list[list[int]]:  # new tokens each time: no prefix-cache hits
        return torch.randint(0, cfg.vocab_size, (batch, length), generator=gen).tolist()

    def race(fns, rounds: int = 3) -> list[float]:
        """Median seconds of each function over alternating rounds (the machine is noisy)."""
        times = [[timed(fn) for fn in fns] for _ in range(rounds)]
        return [statistics.median(t[i] for t in times) for i in range(len(fns))]

    for batch in (1, 16):
        prompts = fresh(batch, 16)
        ours(prompts, 4), ours_captured(prompts, 4), theirs(prompts, 4)  # warm up (and capture the bucket)
        same = engine.generate(prompts[:1], greedy)[0].token_ids
        same_captured = captured.generate(prompts[:1], greedy)[0].token_ids
        with torch.no_grad():
            ref = reference.generate(torch.tensor(prompts[:1]), max_new_tokens=n, do_sample=False)[0, 16:].tolist()
        t_ours, t_cap, t_ref = race(
            [
                lambda b=batch: ours(fresh(b, 16)),
                lambda b=batch: ours_captured(fresh(b, 16)),
                lambda b=batch: theirs(fresh(b, 16)),
            ]
        )
        ours_tps, cap_tps, ref_tps = batch * n / t_ours, batch * n / t_cap, batch * n / t_ref
        print(
            f"batch {batch:2d}, 16-token prompt: nanoseek {ours_tps:7.0f} tok/s, captured {cap_tps:7.0f} | "
            f"transformers {ref_tps:7.0f} tok/s | {t_ref / t_ours:.2f}x, captured {t_ref / t_cap:.2f}x  "
            f"(same greedy tokens: {same == ref == same_captured})"
        )

    # Decode-only time = full generation - prefill (one new token), each on a fresh prompt.
    length = args.long_prompt
    prefill_ours, prefill_ref, t_ours, t_cap, t_ref = race(
        [
            lambda: ours(fresh(1, length), 1),
            lambda: theirs(fresh(1, length), 1),
            lambda: ours(fresh(1, length)),
            lambda: ours_captured(fresh(1, length)),
            lambda: theirs(fresh(1, length)),
        ]
    )
    decode_ours, decode_ref = (n - 1) / (t_ours - prefill_ours), (n - 1) / (t_ref - prefill_ref)
    decode_cap = (n - 1) / (t_cap - prefill_ours)  # the same eager prefill
    print(
        f"batch  1, {length}-token prompt, decode only: nanoseek {decode_ours:7.0f} tok/s, captured "
        f"{decode_cap:7.0f} | transformers {decode_ref:7.0f} tok/s | {decode_ours / decode_ref:.2f}x, captured "
        f"{decode_cap / decode_ref:.2f}x  (prefill {prefill_ours:.2f}s vs {prefill_ref:.2f}s)"
    )

    auto_dtype = auto.model.embed_tokens.weight.dtype
    decode = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    t_auto, t_fp32 = race([lambda: auto.generate(fresh(1, 16), decode), lambda: fp32.generate(fresh(1, 16), decode)])
    print(f"batch  1, the engine's auto dtype ({auto_dtype}) against fp32: {t_fp32 / t_auto:.2f}x the speed")

    long = fresh(1, 256)
    with torch.no_grad():
        out = reference.generate(torch.tensor(long), max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    seen = cache.get_seq_length()
    hf_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    elem = torch.finfo(dtype).bits // 8
    floor = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * elem
    mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * elem
    print(
        f"KV cache bytes per token ({dtype}): nanoseek {engine.kv_cache_bytes_per_token()} | transformers "
        f"{hf_bytes / seen:.0f} | MLA floor {floor} | expanded MHA would be {mha}"
    )


if __name__ == "__main__":
    main()
