"""Atomic writes under real kills: a writer SIGKILLed at any moment leaves the old content or the new one."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import nanoseek
from nanoseek.atomic import atomic_dir, atomic_file, atomic_write

ROOT = Path(nanoseek.__file__).parents[1]
CHUNK = 1 << 16

# Writes the new content chunk by chunk through atomic_file, sleeping between chunks: slow enough to kill.
SLOW_FILE = """
import sys, time
from nanoseek.atomic import atomic_file
with atomic_file(sys.argv[1]) as tmp, open(tmp, "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(b"n" * int(sys.argv[4]))
        f.flush()
        time.sleep(float(sys.argv[3]))
"""

# Builds a new folder file by file through atomic_dir, sleeping between files.
SLOW_DIR = """
import sys, time
from pathlib import Path
from nanoseek.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    for i in range(int(sys.argv[2])):
        (tmp / f"new{i}").write_text("new" * 1000)
        time.sleep(float(sys.argv[3]))
"""

# SIGKILLs itself at the moment the new content is about to be renamed in: after the old folder was moved
# aside (atomic_dir) or once the temporary file is whole (atomic_file).
KILL_AT_RENAME = """
import os, signal, sys
from pathlib import Path
from nanoseek.atomic import atomic_dir, atomic_file

def hook(event, args):
    if event == "os.rename" and Path(args[0]).name.startswith("." + Path(sys.argv[2]).name + ".tmp"):
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
if sys.argv[1] == "dir":
    with atomic_dir(sys.argv[2]) as tmp:
        (tmp / "new").write_text("new")
else:
    with atomic_file(sys.argv[2]) as tmp:
        tmp.write_text("new")
"""

# Rewrites the file forever, each time whole with one letter: a kill lands anywhere in a write.
LOOP = """
import sys
from nanoseek.atomic import atomic_write
i = 0
while True:
    atomic_write(sys.argv[1], bytes([65 + i % 26]) * (1 << 20))
    i += 1
"""


def _spawn(code: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the writer ended before the moment it was to be killed at"
        assert time.monotonic() < deadline, "the writer never got there"
        time.sleep(0.005)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL


def _temps(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.tmp*"))


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_file_killed_mid_write_keeps_the_old_content_and_the_next_write_clears_the_half(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old" * 1000)
    proc = _spawn(SLOW_FILE, target, 1000, 0.01, CHUNK)
    _wait_for(lambda: any(t.stat().st_size >= 2 * CHUNK for t in _temps(target)), proc)
    _kill(proc)
    assert target.read_bytes() == b"old" * 1000
    assert _temps(target)  # the killed writer's half file, under a name no reader opens
    atomic_write(target, "next")
    assert target.read_bytes() == b"next" and not _temps(target)  # its process is gone: swept


def test_a_file_written_to_the_end_holds_exactly_the_new_content(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old" * 1000)
    assert _spawn(SLOW_FILE, target, 20, 0, CHUNK).wait(timeout=30) == 0
    assert target.read_bytes() == b"n" * CHUNK * 20
    assert sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_kill_at_the_rename_leaves_the_old_content(tmp_path, kind):
    target = tmp_path / "thing"
    if kind == "dir":
        target.mkdir()
        (target / "old").write_text("old")
    else:
        target.write_text("old")
    assert _spawn(KILL_AT_RENAME, kind, target).wait(timeout=30) == -signal.SIGKILL
    if kind == "file":
        assert target.read_text() == "old"
        return
    # Killed between the two renames: the old folder is aside, none at the target. The next writer puts it
    # back before anything else, even one that then fails.
    assert not target.exists() and (tmp_path / ".thing.old" / "old").read_text() == "old"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("the build failed")
    assert _tree(target) == {"old": b"old"}
    assert sorted(tmp_path.iterdir()) == [target]  # no .old, and the killed writer's folder swept


def test_a_folder_killed_mid_build_keeps_the_old_folder_and_a_finished_one_replaces_it_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_bytes(b"old" * 1000)
    (target / "sub").mkdir()
    (target / "sub" / "config").write_text("old")
    old = _tree(target)
    proc = _spawn(SLOW_DIR, target, 1000, 0.01)
    _wait_for(lambda: any(len(list(t.iterdir())) >= 2 for t in _temps(target)), proc)
    _kill(proc)
    assert _tree(target) == old
    assert _spawn(SLOW_DIR, target, 5, 0).wait(timeout=30) == 0
    assert _tree(target) == {f"new{i}": b"new" * 1000 for i in range(5)}  # nothing of the old one remains
    assert sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("seed", range(4))
def test_a_kill_at_any_moment_leaves_one_whole_content(tmp_path, seed):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    proc = _spawn(LOOP, target)
    time.sleep(random.Random(seed).uniform(0.05, 0.4))
    _kill(proc)
    data = target.read_bytes()
    assert data == b"old" or (len(data) == 1 << 20 and data == data[:1] * len(data) and data[:1].isupper())


def test_an_exception_inside_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(tmp_path.iterdir()) == [target]


def test_an_exception_inside_leaves_the_old_folder_and_no_temporary(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "new").write_text("half")
        raise KeyboardInterrupt
    assert _tree(target) == {"old": b"old"}
    assert sorted(tmp_path.iterdir()) == [target]


def test_atomic_write_takes_text_and_bytes_and_makes_new_files(tmp_path):
    atomic_write(tmp_path / "a.txt", "héllo\n")
    atomic_write(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    with atomic_dir(tmp_path / "fresh" / "folder") as tmp:  # its parents made too
        (tmp / "x").write_text("x")
    assert _tree(tmp_path / "fresh") == {"folder/x": b"x"}


def test_a_folder_that_appeared_meanwhile_is_kept_without_replace(tmp_path):
    target = tmp_path / "corpus"
    with atomic_dir(target, replace=False) as tmp:
        (tmp / "mine").write_text("mine")
        target.mkdir()  # another process finished first
        (target / "theirs").write_text("theirs")
    assert _tree(target) == {"theirs": b"theirs"}
    assert sorted(tmp_path.iterdir()) == [target]


def test_concurrent_writers_never_mix(tmp_path):
    target = tmp_path / "data.bin"

    def write(letter: bytes) -> None:
        for _ in range(20):
            atomic_write(target, letter * 100_000, fsync=False)

    threads = [threading.Thread(target=write, args=(bytes([65 + i]),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = target.read_bytes()
    assert len(data) == 100_000 and data == data[:1] * len(data)
    assert sorted(tmp_path.iterdir()) == [target]


def test_an_interrupt_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("old")
    real_replace, calls = os.replace, []

    def interrupted_second_rename(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls[:2] == [".model.old", "model"]
    assert _tree(target) == {"old": b"old"} and sorted(tmp_path.iterdir()) == [target]


def test_a_live_writers_temporary_and_another_hosts_are_never_swept(tmp_path):
    from nanoseek.atomic import HOST

    target = tmp_path / "data.bin"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine_live = tmp_path / f".data.bin.tmp{HOST}-{live.pid}-1"
        other_host = tmp_path / f".data.bin.tmpsomewhere_else-{os.getpid() + 1}-1"
        for t in (mine_live, other_host):
            t.write_bytes(b"in progress")
        atomic_write(target, b"new")
        assert mine_live.read_bytes() == other_host.read_bytes() == b"in progress"
    finally:
        live.kill()
        live.wait()
    atomic_write(target, b"newer")  # now its writer is gone: swept
    assert not mine_live.exists() and other_host.exists() and target.read_bytes() == b"newer"
