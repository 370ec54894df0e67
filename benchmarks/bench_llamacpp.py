"""Decode speed against llama.cpp on the same weights (optional: never a test dependency).

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llcpp && tar xzf /tmp/llcpp/*.tar.gz -C /tmp/llcpp
    pip install llama-cpp-python            # builds llama.cpp from source (about 10 minutes on 2 cores)
    python benchmarks/bench_llamacpp.py --llama-cpp-source /tmp/llcpp/llama_cpp_python-*/vendor/llama.cpp \
        [--preset small] [--dtype bf16]

A random model of the preset (tiny by default) is saved in the Hugging Face DeepSeek-V3 format, converted
to GGUF (f32, or bf16 with --dtype bf16) by llama.cpp's own `convert_hf_to_gguf.py`, which maps
DeepseekV3ForCausalLM to its `deepseek2` architecture; our byte-level BPE's pre-tokenizer is unknown to the
converter, so it is mapped to an existing name (`gpt-2`: only speed is compared, never text). Then both
engines decode the same number of greedy tokens after the same prompt at batch 1, with the same thread
count and the same weight dtype (nanoseek with its defaults: captured, packed where that pays), and the
ratio is printed, with the roofline: the bytes of weights a token reads (cost.decode_step_bytes), the
bandwidth each engine streams them at, and its fraction of what `sum` reads on this CPU.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def save_model(out: Path, preset: str) -> Path:
    tokenizer = train_tokenizer(
        iter_texts(stdlib_files()[::50]), vocab_size=get_preset(preset).vocab_size, show_progress=False
    )
    torch.manual_seed(0)
    cfg = get_preset(preset).replace(vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=0)
    save_pretrained(Transformer(cfg), str(out))
    tokenizer.save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp-source", type=Path, required=True, help="the sdist's vendor/llama.cpp folder")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the weights of both engines")
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
            {"fp32": "f32", "bf16": "bf16"}[args.dtype],
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        llama = Llama(str(gguf), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        engine = Engine(model_dir, device="cpu", dtype=dtype)
        prompt = engine.tokenizer.encode_text("def fibonacci(n):")
        n = args.new_tokens

        def ours() -> None:
            engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

        def theirs() -> None:
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
        step = decode_step_bytes(engine.model.cfg, 1, 0, dtype.itemsize)  # the weights one token reads
    rate = {name: n / statistics.median(t) for name, t in times.items()}
    roofline = read_bandwidth()
    print(f"{cpu_features()}; `sum` reads {roofline / 1e9:.1f} GB/s")
    print(
        f"preset {args.preset}, {args.dtype}, {args.threads} threads, batch 1, {n} greedy tokens after a short "
        f"prompt, {step / 1e6:.1f} MB of weights per token:"
    )
    for name, r in rate.items():
        print(f"  {name:9s} {r:7.0f} tok/s, {r * step / 1e9:5.1f} GB/s, {r * step / roofline:4.0%} of the roofline")
    print(f"  nanoseek / llama.cpp: {rate['nanoseek'] / rate['llama.cpp']:.2f}x")


if __name__ == "__main__":
    main()
