"""The cost of grammar-constrained decoding (serve/grammar.py, llguidance): the engine decoding JSON under a
schema against decoding freely, same model, same prompts, in one run; and the mask's own cost per token.

    python benchmarks/bench_grammar.py [--preset tiny] [--vocab 4096] [--new-tokens 128]

The model is random (its weights do not matter for speed) with a tokenizer trained here on the Python
standard library; the schema holds one free string, so a constrained reply runs its whole budget too.
Prints tokens/s of both at batch 1 and 16 and their ratio, and microseconds per token of filling the
token mask (llguidance) and applying it to the logits.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek import Engine, SamplingParams, Transformer, get_preset
from nanoseek.data import iter_texts, stdlib_files
from nanoseek.device import cpu_features
from nanoseek.serve.grammar import Grammars, apply_bitmask, json_grammar
from nanoseek.tokenizer import train_tokenizer

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    tokenizer = train_tokenizer(iter_texts(stdlib_files()[:300]), vocab_size=args.vocab, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(get_preset(args.preset).replace(vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=0))
    engine = Engine(model, tokenizer, device="cpu", dtype=torch.float32, cache_memory_mb=256)
    print(cpu_features())
    print(f"preset {args.preset}, vocabulary {tokenizer.vocab_size}, fp32, greedy, {args.new_tokens} new tokens")
    grammar = json_grammar(tokenizer, SCHEMA, reasoning=False)
    for batch in (1, 16):
        prompts = [tokenizer.encode(f"reply {i} in JSON: ") for i in range(batch)]
        free = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        constrained = SamplingParams(max_tokens=args.new_tokens, temperature=0, grammar=grammar)
        engine.generate(prompts, constrained)  # warm-up (and llguidance's tokenizer, built once)
        rates, counts = {}, {}
        for name, params in (("free", free), ("json", constrained)) * 2:  # alternating: the machine is noisy
            start = time.perf_counter()
            outs = engine.generate(prompts, params)
            counts[name] = sum(o.completion_tokens for o in outs)
            rates.setdefault(name, []).append(counts[name] / (time.perf_counter() - start))
        f, j = max(rates["free"]), max(rates["json"])
        print(
            f"batch {batch:2d}: free {f:7.0f} tok/s | JSON schema {j:7.0f} tok/s | {j / f:.2f}x  "
            f"({counts['free']} and {counts['json']} tokens)"
        )
    grammars = Grammars(tokenizer, tokenizer.vocab_size)
    matcher, logits = grammars.matcher(grammar), torch.randn(1, tokenizer.vocab_size)
    import llguidance.torch as lgt

    fill, apply = [], []
    bitmask = lgt.allocate_token_bitmask(1, grammars.ll_tokenizer.vocab_size)
    for _ in range(200):
        start = time.perf_counter()
        lgt.fill_next_token_bitmask(matcher, bitmask, 0)
        middle = time.perf_counter()
        masked = apply_bitmask(logits, bitmask)
        end = time.perf_counter()
        fill.append(middle - start)
        apply.append(end - middle)
        token = int(masked.argmax())
        if token == tokenizer.eos_id or not matcher.consume_token(token):
            matcher.reset()
    print(
        f"mask per token: fill {statistics.median(fill) * 1e6:.0f} us, apply {statistics.median(apply) * 1e6:.0f} us"
        f" (median of 200, vocabulary {tokenizer.vocab_size})"
    )


if __name__ == "__main__":
    main()
