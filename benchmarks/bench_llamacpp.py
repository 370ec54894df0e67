"""Decode speed against llama.cpp on the same weights (optional: never a test dependency).

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llcpp && tar xzf /tmp/llcpp/*.tar.gz -C /tmp/llcpp
    pip install llama-cpp-python            # builds llama.cpp from source (about 10 minutes on 2 cores)
    python benchmarks/bench_llamacpp.py --llama-cpp-source /tmp/llcpp/llama_cpp_python-*/vendor/llama.cpp \
        [--preset small] [--dtype bf16|int8]

A random model of the preset (tiny by default) is saved in the Hugging Face DeepSeek-V3 format, converted
to GGUF (f32; bf16 with --dtype bf16; q8_0 with --dtype int8, against nanoseek's `--weights int8`, whose
weights and head are int8 with a scale per row where q8_0 has one per 32 weights) by llama.cpp's own
`convert_hf_to_gguf.py`, which maps
DeepseekV3ForCausalLM to its `deepseek2` architecture; our byte-level BPE's pre-tokenizer is unknown to the
converter, so it is mapped to an existing name (`gpt-2`: only speed is compared, never text). Then both
engines decode the same number of greedy tokens after the same prompt, with the same thread count and the
same weight dtype (nanoseek with its defaults: captured, packed where that pays), and the ratio is printed,
with the roofline: the bytes of weights a step reads (cost.decode_step_bytes), the bandwidth each engine
streams them at, and its fraction of what `sum` reads on this CPU. `--batch B` decodes B sequences at once:
llama.cpp through its batch API (one `llama_decode` of B tokens, one sequence id each, per step), as
`llama-batched-bench` does.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from nanoseek import Engine, SamplingParams, Transformer, get_preset, save_pretrained
from nanoseek.cost import decode_step_bytes
from nanoseek.data import iter_texts, stdlib_files
from nanoseek.device import cpu_features, read_bandwidth
from nanoseek.tokenizer import train_tokenizer

CONVERT = """
import runpy, sys
source = sys.argv.pop(1)
sys.path.insert(0, source)
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # speed only: any known name
runpy.run_path(source + "/convert_hf_to_gguf.py", run_name="__main__")
"""


class Mode(NamedTuple):
    outtype: str  # llama.cpp's (convert_hf_to_gguf.py --outtype)
    compute: torch.dtype  # nanoseek's
    weights: str  # nanoseek's --weights
    bytes: float  # per weight (int8: the scales add 4 bytes per row, q8_0's 2 per 32 weights)


DTYPES = {
    "fp32": Mode("f32", torch.float32, "fp32", 4),
    "bf16": Mode("bf16", torch.bfloat16, "bf16", 2),
    "int8": Mode("q8_0", torch.float32, "int8", 1),
}


def save_model(out: Path, preset: str) -> Path:
    tokenizer = train_tokenizer(
        iter_texts(stdlib_files()[::50]), vocab_size=get_preset(preset).vocab_size, show_progress=False
    )
    torch.manual_seed(0)
    cfg = get_preset(preset).replace(vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=0)
    save_pretrained(Transformer(cfg), str(out))
    tokenizer.save(out)
    return out


class BatchedLlama:
    """B greedy sequences decoded together through llama.cpp's batch API (one context, one sequence id each)."""

    def __init__(self, llama, batch: int, context: int, threads: int) -> None:
        import llama_cpp as lc

        self.lc, self.batch = lc, batch
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = batch * context, batch * context, batch * context
        params.n_seq_max, params.kv_unified = batch, True
        params.n_threads, params.n_threads_batch = threads, threads
        self.ctx = lc.llama_init_from_model(llama._model.model, params)
        self.vocab = llama.n_vocab()
        self.tokens = lc.llama_batch_init(batch * context, 0, 1)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> list[int]:
        """Feed (sequence, position, token, wants logits) rows; the greedy next token of each wanted row."""
        b = self.tokens
        for i, (seq, pos, token, wanted) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, wanted
        b.n_tokens = len(rows)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        wanted = [i for i, row in enumerate(rows) if row[3]]
        logits = [np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), (self.vocab,)) for i in wanted]
        return [int(row.argmax()) for row in logits]

    def generate(self, prompt: list[int], new_tokens: int) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        rows = [(s, p, t, p == len(prompt) - 1) for s in range(self.batch) for p, t in enumerate(prompt)]
        last = self._decode(rows)
        for step in range(new_tokens - 1):
            last = self._decode([(s, len(prompt) + step, last[s], True) for s in range(self.batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp-source", type=Path, required=True, help="the sdist's vendor/llama.cpp folder")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="the weights of both engines")
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("this benchmark needs llama-cpp-python: pip install llama-cpp-python") from None
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(Path(tmp) / "model", args.preset)
        gguf = Path(tmp) / "model.gguf"
        cmd = [
            sys.executable,
            "-c",
            CONVERT,
            str(args.llama_cpp_source),
            str(model_dir),
            "--outfile",
            str(gguf),
            "--outtype",
            DTYPES[args.dtype].outtype,
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        llama = Llama(str(gguf), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
        batched = BatchedLlama(llama, args.batch, args.new_tokens + 32, args.threads) if args.batch > 1 else None
        mode = DTYPES[args.dtype]
        engine = Engine(model_dir, device="cpu", dtype=mode.compute, weights=mode.weights)
        prompt = engine.tokenizer.encode_text("def fibonacci(n):")
        n, batch = args.new_tokens, args.batch

        def ours() -> None:
            engine.generate([prompt] * batch, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

        def theirs() -> None:
            if batched is not None:
                return batched.generate(prompt, n)
            llama.reset()
            for i, _ in enumerate(llama.generate(prompt, temp=0.0, reset=True)):
                if i + 1 == n:
                    break

        ours(), theirs()  # warm up
        times = {"nanoseek": [], "llama.cpp": []}
        for _ in range(3):
            for name, fn in (("nanoseek", ours), ("llama.cpp", theirs)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        step = decode_step_bytes(engine.model.cfg, batch, 0, mode.bytes)  # the weights one step reads
    rate = {name: n * batch / statistics.median(t) for name, t in times.items()}
    roofline = read_bandwidth()
    print(f"{cpu_features()}; `sum` reads {roofline / 1e9:.1f} GB/s")
    print(
        f"preset {args.preset}, {args.dtype}, {args.threads} threads, batch {batch}, {n} greedy tokens after a "
        f"short prompt, {step / 1e6:.1f} MB of weights per step:"
    )
    for name, r in rate.items():
        streamed = r / batch * step  # steps per second times the bytes a step reads
        print(f"  {name:9s} {r:7.0f} tok/s, {streamed / 1e9:5.1f} GB/s, {streamed / roofline:4.0%} of the roofline")
    print(f"  nanoseek / llama.cpp: {rate['nanoseek'] / rate['llama.cpp']:.2f}x")


if __name__ == "__main__":
    main()
