"""The disk tier of the prefix cache and the engine's cache namespaces."""

import os
import time

import pytest
import torch
from hf_reference import perturb_

from nanoseek import Engine, SamplingParams, Transformer, get_preset
from nanoseek.serve.prefix_cache import DiskCache

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = [(7 * i) % 290 + 3 for i in range(45)]  # 45 tokens: 5 full blocks of 8, the last token computed


def block(value: float) -> dict[str, torch.Tensor]:
    return {"kv": torch.full((2, 8, 5), value)}


def test_disk_cache_round_trips_and_a_damaged_file_is_a_miss_that_is_removed(tmp_path):
    cache = DiskCache(tmp_path)
    for i in range(3):
        cache.put(bytes([i]) * 16, block(i))
    cache.flush()
    assert torch.equal(cache.get(bytes([1]) * 16)["kv"], block(1)["kv"])
    files = {f.stem: f for f in tmp_path.glob("*/*.kv")}
    flipped, truncated = files[(bytes([0]) * 16).hex()], files[(bytes([2]) * 16).hex()]
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 1
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    assert cache.get(bytes([0]) * 16) is None and cache.get(bytes([2]) * 16) is None
    assert not flipped.exists() and not truncated.exists() and cache.corrupt == 2
    assert cache.get(b"\x09" * 16) is None  # never written


def test_a_block_file_copied_over_another_blocks_name_or_from_another_model_is_a_miss(tmp_path):
    one, two = b"\x01" * 16, b"\x02" * 16
    cache = DiskCache(tmp_path, fingerprint=b"m" * 16)
    cache.put(one, block(1.0))
    cache.put(two, block(2.0))
    cache.flush()
    path = {f.stem: f for f in tmp_path.glob("*/*.kv")}
    path[two.hex()].write_bytes(path[one.hex()].read_bytes())  # a valid file under the wrong name
    assert cache.get(two) is None and cache.corrupt == 1
    other_model = DiskCache(tmp_path, fingerprint=b"x" * 16)  # same folder, another model's weights
    assert other_model.get(one) is None and other_model.corrupt == 1


def test_a_fifo_in_the_cache_folder_is_never_opened(tmp_path):
    digest = b"\x05" * 16
    (tmp_path / digest.hex()[:2]).mkdir()
    os.mkfifo(tmp_path / digest.hex()[:2] / f"{digest.hex()}.kv")  # opening it for reading would block
    cache = DiskCache(tmp_path)
    assert digest not in cache and cache.get(digest) is None
    cache.put(digest, block(5.0))  # a real block replaces it
    cache.flush()
    assert torch.equal(cache.get(digest)["kv"], block(5.0)["kv"])


def test_disk_cache_stays_under_its_bound_evicting_the_least_recently_used(tmp_path):
    probe = DiskCache(tmp_path / "probe")
    probe.put(b"\0" * 16, block(0))
    probe.flush()
    size = probe.bytes
    cache = DiskCache(tmp_path / "lru", max_bytes=3 * size)
    for i in range(3):
        cache.put(bytes([i]) * 16, block(i))
    cache.flush()
    assert cache.get(bytes([0]) * 16) is not None  # 0 is now the most recently used
    for i in (3, 4):
        cache.put(bytes([i]) * 16, block(i))
    cache.flush()
    assert len(list((tmp_path / "lru").glob("*/*.kv"))) == 3 and cache.bytes <= 3 * size
    assert [bytes([i]) * 16 in cache for i in range(5)] == [True, False, False, True, True]
    reopened = DiskCache(tmp_path / "lru", max_bytes=3 * size)  # the index is rebuilt from the files
    assert len(reopened) == 3 and reopened.bytes == cache.bytes


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return perturb_(Transformer(get_preset("tiny").replace(vocab_size=300, num_hidden_layers=2)), seed=3).eval()


def engine(model, tmp_path, **kwargs) -> Engine:
    options = dict(device="cpu", dtype=torch.float32, block_size=8, cache_memory_mb=1, cache_dir=tmp_path / "kv")
    options["enforce_eager"] = True  # the cache is under test, not compilation
    return Engine(model, **(options | kwargs))


def test_a_new_engine_loads_prefix_blocks_from_disk_with_the_same_output(model, tmp_path):
    first = engine(model, tmp_path)
    [cold] = first.generate([PROMPT], GREEDY)
    first.close()
    assert cold.cached_tokens == 0
    second = engine(model, tmp_path)
    [warm] = second.generate([PROMPT], GREEDY)
    assert warm.cached_tokens == 40 and warm.token_ids == cold.token_ids
    assert second.metrics.disk_hit_tokens == 40
    [again] = second.generate([PROMPT], GREEDY)  # now from memory
    assert again.cached_tokens == 40 and second.metrics.disk_hit_tokens == 40


def test_cache_namespaces_and_models_never_share_blocks(model, tmp_path):
    first = engine(model, tmp_path)
    first.generate([PROMPT], GREEDY)
    first.close()
    other = engine(model, tmp_path)
    [out] = other.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0), cache_salt="key-b")
    assert out.cached_tokens == 0
    [out] = other.generate([PROMPT], GREEDY)  # the default namespace still hits
    assert out.cached_tokens == 40
    changed = perturb_(Transformer(model.cfg), seed=9).eval()  # same shapes, other weights
    [out] = engine(changed, tmp_path).generate([PROMPT], GREEDY)
    assert out.cached_tokens == 0


def test_a_prompt_of_whole_blocks_hits_them_all_and_recomputes_only_its_last_token(model, tmp_path):
    exact = PROMPT[:40]  # 5 blocks of 8
    eng = engine(model, tmp_path, cache_dir=None)
    [cold] = eng.generate([exact], GREEDY)
    before = eng.pool.kv.clone()
    prefill_tokens = eng.metrics.prompt_tokens
    [warm] = eng.generate([exact], GREEDY)
    assert warm.cached_tokens == 40 and warm.token_ids == cold.token_ids
    shared = list(eng.block_manager.block_of.values())
    assert len(shared) == 5
    for block in shared:  # the shared blocks were not written: the last token went to a private copy
        slots = slice(block * 8, (block + 1) * 8)
        assert torch.equal(eng.pool.kv[:, slots], before[:, slots])
    assert eng.metrics.prompt_tokens == 2 * prefill_tokens
    [fresh] = engine(model, tmp_path, cache_dir=None).generate([exact], GREEDY)
    assert fresh.token_ids == cold.token_ids


def test_start_up_removes_dead_writers_half_files_but_not_a_live_servers(tmp_path):
    """Servers may share a cache folder: one starting must not delete what another is writing."""
    import subprocess
    import sys

    from nanoseek.atomic import HOST

    shard = tmp_path / "ab"
    shard.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    half_dead = shard / f".{'ab' * 16}.kv.tmp{HOST}-{int(dead.stdout)}-1"
    half_live = shard / f".{'cd' * 16}.kv.tmp{HOST}-{os.getpid()}-1"
    for half in (half_dead, half_live):
        half.write_bytes(b"half a block")
    DiskCache(tmp_path)
    assert not half_dead.exists() and half_live.exists()


def test_a_huge_file_under_a_blocks_name_is_a_miss_read_never(tmp_path):
    """A 3 GiB (sparse) file under a block's name once stalled the engine 25 s and took memory to 6.7 GB:
    a file larger than any block this cache writes is refused by its size, unread, and removed."""
    digest = b"\x07" * 16
    (tmp_path / digest.hex()[:2]).mkdir()
    huge = tmp_path / digest.hex()[:2] / f"{digest.hex()}.kv"
    with open(huge, "wb") as f:
        f.truncate(3 * 2**30)
    cache = DiskCache(tmp_path, max_file_bytes=2**20)
    start = time.monotonic()
    assert cache.get(digest) is None and cache.corrupt == 1 and not huge.exists()
    assert time.monotonic() - start < 1
