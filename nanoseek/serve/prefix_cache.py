"""The disk tier of the prefix cache: full KV blocks as checksummed files, bounded in size, LRU-evicted.

DeepSeek's API keeps prompt prefixes on disk and bills a hit at a quarter of a miss. Here each full cache
block (64 tokens in the server) is one file named by its prefix hash, which chains the model, the
namespace (API key) and every token id before it, so a file can only ever be found by the same model
and key with the same prefix. A file is `MAGIC + prefix hash + model fingerprint + sha256(payload) +
payload` (payload: the block's latents as safetensors): it proves what it holds, so a file copied or
renamed over another block's name, one of another model, or one that fails its checksum (truncated,
flipped bits) is a miss and is deleted, never a wrong answer. Only regular files are ever opened (a FIFO
or a device dropped into the folder could block the engine). Writes happen on a background thread,
atomically (write to a temporary name, then rename), so a crash never leaves a half file under a real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nanoseek.atomic import atomic_write, sweep_folder

MAGIC = b"NSKV0002"
DIGEST, FINGERPRINT, CHECKSUM = 16, 16, 32
HEADER = len(MAGIC) + DIGEST + FINGERPRINT + CHECKSUM


class TooLarge(ValueError):
    """A file under a block's name larger than any block this cache writes."""


def _read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes; OSError for anything else (never blocks on a FIFO,
    never follows links), TooLarge (unread) for a bigger file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise TooLarge(f"{path} holds {st.st_size} bytes, more than a block's {max_bytes}")
        return f.read(max_bytes + 1)


class DiskCache:
    def __init__(
        self,
        directory: str | Path,
        max_bytes: int = 8 * 2**30,
        fingerprint: bytes = bytes(FINGERPRINT),
        max_file_bytes: int = 256 * 2**20,
    ):
        """max_file_bytes: the largest block file read (the engine passes its block's size and headroom); a
        bigger file under a block's name is corrupt, refused by its size."""
        if len(fingerprint) != FINGERPRINT:
            raise ValueError(f"the model fingerprint must be {FINGERPRINT} bytes")
        self.fingerprint = fingerprint
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_file_bytes = max_bytes, max_file_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        for shard in self.dir.iterdir():  # half files that this host's dead writers left; live ones stay
            if shard.is_dir():
                sweep_folder(shard)
        files = [(f, f.lstat()) for f in self.dir.glob("*/*.kv")]
        for f, st in sorted(files, key=lambda item: item[1].st_mtime):
            if stat.S_ISREG(st.st_mode):  # a FIFO, device or link under a block's name is never opened
                self._index[f.stem] = st.st_size
        self.bytes = sum(self._index.values())
        self.hits = self.misses = self.corrupt = 0
        self._queue: queue.Queue[tuple[str, dict[str, torch.Tensor]] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="nanoseek-disk-cache", daemon=True)
        self._writer.start()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, digest: bytes) -> bool:
        return digest.hex() in self._index

    def _path(self, name: str) -> Path:
        return self.dir / name[:2] / f"{name}.kv"

    def get(self, digest: bytes) -> dict[str, torch.Tensor] | None:
        name = digest.hex()
        with self._lock:
            if name not in self._index:
                self.misses += 1
                return None
            self._index.move_to_end(name)
        path = self._path(name)
        try:
            data = _read_regular(path, self.max_file_bytes)
        except OSError:  # evicted meanwhile, unreadable, or not a regular file: a plain miss
            self.misses += 1
            self._forget(name)
            return None
        except TooLarge:
            data = b""  # corrupt: counted and removed below
        try:
            holds = data[len(MAGIC) : len(MAGIC) + DIGEST]
            model = data[len(MAGIC) + DIGEST : len(MAGIC) + DIGEST + FINGERPRINT]
            checksum, payload = data[HEADER - CHECKSUM : HEADER], data[HEADER:]
            if data[: len(MAGIC)] != MAGIC or holds != digest or model != self.fingerprint:
                raise ValueError("another prefix's or another model's block, or another format")
            if hashlib.sha256(payload).digest() != checksum:
                raise ValueError("checksum mismatch")
            tensors = load_safetensors(payload)
        except Exception:  # misplaced, truncated or corrupt: a miss, and the file goes
            self.corrupt += 1
            self.misses += 1
            self._forget(name)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # the LRU order survives a restart
        self.hits += 1
        return tensors

    def put(self, digest: bytes, tensors: dict[str, torch.Tensor]) -> None:
        """Queue a block for writing (tensors must be private CPU copies)."""
        if digest.hex() not in self._index:
            self._queue.put((digest.hex(), tensors))

    def flush(self) -> None:
        """Wait until every queued block is on disk."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join()

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(*item)
            except OSError:  # a full or read-only disk costs cache hits, never a request
                pass
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if name in self._index:
            return
        payload = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
        path = self._path(name)
        path.parent.mkdir(exist_ok=True)
        header = MAGIC + bytes.fromhex(name) + self.fingerprint + hashlib.sha256(payload).digest()
        # No fsync: a block torn by a power loss fails its checksum, a miss; a failed write leaves no half file.
        atomic_write(path, header + payload, fsync=False, sweep=False)  # swept at start-up
        with self._lock:
            self._index[name] = path.stat().st_size
            self.bytes += self._index[name]
            evict = []
            while self.bytes > self.max_bytes and len(self._index) > 1:
                old, size = self._index.popitem(last=False)
                self.bytes -= size
                evict.append(old)
        for old in evict:
            self._path(old).unlink(missing_ok=True)

    def _forget(self, name: str) -> None:
        with self._lock:
            self.bytes -= self._index.pop(name, 0)
        self._path(name).unlink(missing_ok=True)
