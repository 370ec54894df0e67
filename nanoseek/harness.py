"""Evaluation with EleutherAI's lm-evaluation-harness against a served model (`nanoseek eval --lm-eval`).

lm-eval's `local-completions` model talks to any OpenAI-compatible /v1/completions: loglikelihood tasks
(multiple choice) send token-id prompts with echo, logprobs and max_tokens 1 and sum the continuation's
log-probabilities; generate_until tasks send prompts with stop strings. It tokenises with the server's
own tokenizer through vLLM's /tokenize, /detokenize and /tokenizer_info (tokenizer_backend=remote).
Task YAMLs name their data files relative to themselves here (datasets resolves them against the working
directory, so they are rewritten with absolute paths into a temporary include folder).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def prepare_tasks(yamls: list[Path], into: Path) -> list[str]:
    """Each task YAML copied into `into` with its relative data files made absolute; the tasks' names."""
    import yaml

    names = []
    for path in yamls:
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, dict) or "task" not in config:
            raise ValueError(f"{path} is not an lm-eval task YAML (it names no task)")
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):  # (an absolute path stays as it is)
            config["dataset_kwargs"]["data_files"] = {k: str((path.parent / f).resolve()) for k, f in files.items()}
        elif isinstance(files, str):
            config["dataset_kwargs"]["data_files"] = str((path.parent / files).resolve())
        (into / path.name).write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
        names.append(config["task"])
    return names


@contextmanager
def served(model_dir: str, concurrency: int):
    """`nanoseek serve` on a free loopback port for the evaluation; its base URL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", model_dir]
    cmd += ["--port", str(port), "--max-seqs", str(concurrency)]
    proc = subprocess.Popen(cmd)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 900  # compiling buckets takes a while
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nanoseek serve exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nanoseek serve did not answer /health in 15 minutes: {' '.join(cmd)}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def run(
    url: str,
    yamls: list[Path],
    model_name: str = "nanoseek",
    limit: int | None = None,
    output: str | None = None,
    concurrency: int = 1,
    api_key: str | None = None,
) -> int:
    """lm_eval on the tasks against the server at url; its exit code. Per-item results (log-likelihoods,
    replies) go to OUTPUT/<model>/samples_<task>_<time>.jsonl with --output."""
    try:
        import lm_eval  # noqa: F401 - only to say what to install
    except ImportError:
        raise SystemExit("lm-evaluation-harness is not installed: pip install 'lm-eval[api]'") from None
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    context = httpx.get(url + "/tokenizer_info", headers=headers, timeout=30).raise_for_status().json()
    model_args = (
        f"base_url={url}/v1/completions,model={model_name},tokenizer_backend=remote,"
        f"tokenized_requests=True,max_length={context['model_max_length']},num_concurrent={concurrency},"
        "max_retries=3"
    )
    with tempfile.TemporaryDirectory(prefix="nanoseek-lm-eval-") as include:
        names = prepare_tasks(yamls, Path(include))
        cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--batch_size", "1"]
        cmd += ["--model_args", model_args, "--include_path", include, "--tasks", *names]
        cmd += ["--limit", str(limit)] if limit else []
        cmd += ["--log_samples", "--output_path", output] if output else []
        env = {**os.environ, **OFFLINE, "OPENAI_API_KEY": api_key or ""}
        return subprocess.run(cmd, env=env).returncode
