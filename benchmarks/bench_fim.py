"""What fill-in-the-middle pretraining buys: the same tiny model pretrained on the stdlib with and without
FIM documents (--fim-rate 0.1, V3's, against 0), then asked to fill a hole in held-out stdlib functions
the way /v1/completions with `suffix` asks (tokenizer.fim_ids), greedy.

    python benchmarks/bench_fim.py [--steps 300] [--holes 20]

Prints, per model, how often the filled middle equals the removed line exactly, the mean log-probability
per token of the true middle, and one example. Both runs read the same stdlib corpus and tokenizer.
"""

from __future__ import annotations

import argparse
import ast
import random
import tempfile
from pathlib import Path

import torch

from nanoseek import Engine, SamplingParams
from nanoseek.data import ensure_default_data, prepare, stdlib_files
from nanoseek.device import cpu_features
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.trainer import TrainConfig, Trainer


def holes(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prefix, middle, suffix) of held-out functions: one line of a short function's body removed."""
    rng, out = random.Random(seed), []
    files = sorted(stdlib_files(), key=str)[-40:]  # the end of the list: few of them in the training windows
    for path in files:
        source = path.read_text(encoding="utf-8", errors="ignore")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and 3 <= node.end_lineno - node.lineno <= 8:
                lines = ast.get_source_segment(source, node).splitlines(keepends=True)
                k = rng.randint(1, len(lines) - 1)
                out.append(("".join(lines[:k]), lines[k], "".join(lines[k + 1 :])))
    rng.shuffle(out)
    return out[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--holes", type=int, default=20)
    args = parser.parse_args()
    print(cpu_features())
    base = ensure_default_data(4096)
    tokenizer = load_tokenizer(base / "tokenizer")
    cases = holes(args.holes)
    with tempfile.TemporaryDirectory() as tmp:
        for rate in (0.0, 0.1):
            data = Path(tmp) / f"data-{rate}"
            prepare(stdlib_files(), tokenizer, data, fim_rate=rate, progress=False)
            (data / "tokenizer").mkdir()
            tokenizer.save(data / "tokenizer")
            out = Path(tmp) / f"run-{rate}"
            cfg = TrainConfig(
                data=str(data),
                out=str(out),
                steps=args.steps,
                progress=False,
                sample_tokens=0,
                eval_every=args.steps,
                save_every=args.steps,
                seed=0,
            )
            Trainer(cfg).fit()
            engine = Engine(out / "model", device="cpu", dtype=torch.float32)
            exact, logprob, example = 0, 0.0, None
            for prefix, middle, suffix in cases:
                ids = tokenizer.fim_ids(prefix, suffix)
                [reply] = engine.generate([ids], SamplingParams(max_tokens=48, temperature=0, stop=["\n"]))
                exact += reply.text.strip() == middle.strip()
                scored = engine.generate(
                    [ids + tokenizer.encode_text(middle)], SamplingParams(max_tokens=0, prompt_logprobs=0)
                )[0]
                tail = [lp for lp, _ in scored.prompt_logprobs[len(ids) :]]
                logprob += sum(tail) / max(len(tail), 1)
                example = example or (middle.strip(), reply.text.strip())
            print(
                f"fim-rate {rate}: exact middle {exact}/{len(cases)}, mean log-prob per middle token "
                f"{logprob / len(cases):.3f}; e.g. true {example[0]!r} -> filled {example[1]!r}"
            )


if __name__ == "__main__":
    main()
