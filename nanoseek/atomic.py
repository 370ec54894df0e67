"""Atomic writes: a file or a folder is built under a temporary name beside its target, then renamed in.

A reader, or a run resumed after a kill at any moment, finds at `path` either the old content or the new
one, never half of either: checkpoint files and folders, the trainer's exported model, the cached corpus,
run settings and metrics, stage results, distillation traces and prefix-cache blocks all go through here.
(A folder is swapped in by two renames: between them a concurrent reader finds none, and the next
`atomic_dir` on the path, or the interrupted one's own clean-up, puts the old one back.)

    atomic_write(path, text_or_bytes)             # whole content at once
    with atomic_file(path) as tmp: save_file(tensors, tmp)    # a writer that takes a path
    with atomic_dir(path) as tmp: ...             # a folder, swapped in whole

Temporary names carry the host, process and thread, so concurrent writers never share one, and a temporary
left by a killed process of this host is removed by the next write to the same path (a folder shared
between hosts keeps the others' temporaries: their processes cannot be probed from here).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "atomic_write"]


def atomic_write(path: str | Path, data: str | bytes, *, fsync: bool = True, sweep: bool = True) -> None:
    """Write `data` (str as UTF-8) to `path`: the old content or the new one is there, never part of either."""
    with atomic_file(path, fsync=fsync, sweep=sweep) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_file(path: str | Path, *, fsync: bool = True, sweep: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` when the block ends. An exception in the
    block removes the temporary file (a full disk must not fill up with half files) and propagates.

    fsync=False skips flushing to disk before the rename: a kill still leaves old or new, but a power loss
    may leave an empty or torn file (for files that prove their own content, such as the prefix cache's).
    sweep=False skips looking for dead writers' temporaries (a hot path whose owner sweeps at start-up)."""
    path = Path(path)
    if sweep:
        _sweep(path)
    tmp = _temp(path)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: nothing half-written stays behind
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync(path.parent)  # the rename itself survives a power loss


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """A fresh temporary folder beside `path` to fill; when the block ends, every file in it is fsynced and
    the folder takes the place of `path` whole. An exception in the block removes the temporary folder.

    replace=False: a folder that appeared at `path` meanwhile (another process finished first) is kept and
    the new one dropped, so a reader of that folder never sees it vanish."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    # A previous writer killed between its two renames left the old folder aside and none at `path`.
    if old.exists():
        if path.exists():  # killed after the swap, before the cleanup
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    _sweep(path)
    tmp = _temp(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a killed process whose pid (and thread id) we now have left it
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(root, name))
            _fsync(Path(root))
        if not replace and path.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        # Two renames, since a folder cannot be renamed over a non-empty one; a kill between them is
        # repaired by the next atomic_dir on this path (above).
        if replace and path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if replace or not path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost the race to another process: its folder stays
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():  # interrupted between the two renames
            os.replace(old, path)
        raise
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


HOST = socket.gethostname().replace("-", "_")  # '-' separates the fields of a temporary's name


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{HOST}-{os.getpid()}-{threading.get_ident()}")


def _sweep(path: Path) -> None:
    """Remove the temporaries for `path` that killed processes left (never a live writer's)."""
    sweep_folder(path.parent, f".{path.name}.tmp{HOST}-")


def sweep_folder(folder: str | Path, prefix: str = ".") -> None:
    """Remove the temporaries in `folder` (those whose names start with `prefix`: by default any target's) that
    this host's killed processes left; a live writer's, or another host's, stay."""
    if os.name != "posix":  # os.kill(pid, 0) probes on POSIX only
        return
    mark = f".tmp{HOST}-"
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if not entry.name.startswith(prefix) or mark not in entry.name:
                continue
            pid = entry.name.rpartition(mark)[2].split("-")[0]  # this host's writers only
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
