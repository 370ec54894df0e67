"""The speedrun's report card header: enough to reproduce the card (nanochat's report gives the same)."""

import subprocess
from pathlib import Path

import torch

from nanoseek.report import header_line, provenance


def test_the_header_names_the_commit_the_machine_the_software_and_the_command():
    p = provenance()
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert p["commit"] == head and len(head) == 40
    assert (p["torch"], p["threads"]) == (torch.__version__, torch.get_num_threads())
    assert p["avx512_bf16"] == ("avx512_bf16" in Path("/proc/cpuinfo").read_text().split())
    line = header_line(p)
    for part in (head[:12], p["cpu"], f"{p['cores']} cores", f"torch {p['torch']}", p["date"], p["command"]):
        assert part in line
