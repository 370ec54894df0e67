"""Text output per token against the text's length: the engine's incremental detokeniser (output.py)
against decoding and scanning the whole output at every token (what the engine did before), same tokens,
same four stop strings, in one run.

    python benchmarks/bench_output.py [--tokens 8000]

Prints microseconds per token over the first and the last 500 tokens of each: the incremental one
costs the same at the end as at the start; the whole-text one grows with the text.
"""

from __future__ import annotations

import argparse
import time

from nanoseek.data import iter_texts, stdlib_files
from nanoseek.device import cpu_features
from nanoseek.serve.output import TextOutput
from nanoseek.tokenizer import train_tokenizer

STOPS = ["<|stop one|>", "never here", "zzzz", "\n\n\n\n"]


def incremental(tokenizer, ids: list[int]) -> list[float]:
    out, times = TextOutput(tokenizer, STOPS), []
    for token in ids:
        start = time.perf_counter()
        out.add(token)
        times.append(time.perf_counter() - start)
    return times


def whole_text(tokenizer, ids: list[int]) -> list[float]:
    times = []
    for n in range(1, len(ids) + 1):
        start = time.perf_counter()
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        any(s in text for s in STOPS)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8000)
    args = parser.parse_args()
    files = stdlib_files()
    tokenizer = train_tokenizer(iter_texts(files[::50]), vocab_size=4096, show_progress=False)
    ids = [i for f in files[:40] for i in tokenizer.encode_text(f.read_text(errors="replace"))][: args.tokens]
    print(cpu_features())
    print(f"{len(ids)} tokens, {len(STOPS)} stop strings; microseconds per token, first 500 -> last 500:")
    for name, fn in (("incremental (nanoseek)", incremental), ("whole text each token", whole_text)):
        times = fn(tokenizer, ids)
        early, late = (sum(part) / len(part) * 1e6 for part in (times[:500], times[-500:]))
        print(f"  {name:24s} {early:8.1f} -> {late:8.1f}  ({late / early:.1f}x)")


if __name__ == "__main__":
    main()
