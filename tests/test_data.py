"""Token shards and the packed loader: formats, determinism, exact resume, clear errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.data import DataMeta, PackedLoader, expand_inputs, prepare


def test_text_jsonl_and_parquet_become_eos_separated_documents(tmp_path, tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha beta")
    (src / "b.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    pq.write_table(pa.table({"text": ["epsilon", "zeta"]}), src / "c.parquet")
    meta = prepare(expand_inputs([str(src)]), tokenizer, tmp_path / "out", val_permille=0, progress=False)
    assert meta.documents == {"train": 5, "val": 0}
    stream = np.fromfile(tmp_path / "out" / meta.shards["train"][0]["file"], dtype=meta.dtype)
    docs = tokenizer.decode(stream.tolist()).split("<｜end▁of▁sentence｜>")
    assert docs == ["alpha beta", "gamma", "delta", "epsilon", "zeta", ""]
    assert meta.dtype == "uint16"


def test_validation_split_is_never_empty(tmp_path, tokenizer):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i}")
    meta = prepare(expand_inputs([str(tmp_path)]), tokenizer, tmp_path / "out", val_permille=1, progress=False)
    assert meta.documents == {"train": 2, "val": 1}


def test_prepare_refuses_a_corpus_too_small_to_split(tmp_path, tokenizer):
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(ValueError, match="too few"):
        prepare([tmp_path / "one.txt"], tokenizer, tmp_path / "out", progress=False)


def test_empty_input_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text in 1 input file"):
        prepare([tmp_path / "empty.txt"], tokenizer, tmp_path / "out", progress=False)


def test_non_utf8_file_is_named(tmp_path, tokenizer):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        prepare([tmp_path / "latin1.txt"], tokenizer, tmp_path / "out", progress=False)


def test_bad_jsonl_line_is_located(tmp_path, tokenizer):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2 needs a string field 'text'"):
        prepare([tmp_path / "x.jsonl"], tokenizer, tmp_path / "out", progress=False)


def test_missing_input_is_named():
    with pytest.raises(FileNotFoundError, match="nowhere"):
        expand_inputs(["/nowhere/*.txt"])


def test_windows_are_contiguous_slices_of_the_stream(data_dir):
    meta = DataMeta.load(data_dir)
    stream = np.fromfile(data_dir / meta.shards["train"][0]["file"], dtype=meta.dtype)
    loader = PackedLoader(data_dir, "train", batch_size=4, seq_len=32, seed=0)
    batch = loader.next_batch()
    assert batch.shape == (4, 33) and batch.dtype == torch.int64
    for row, index in zip(batch, loader.order(0)[:4], strict=True):
        start = int(index) * 32
        assert row.tolist() == stream[start : start + 33].tolist()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 100), batch=st.integers(1, 8))
def test_an_epoch_visits_every_window_once_in_a_seeded_order(data_dir, seed, batch):
    loader = PackedLoader(data_dir, "train", batch_size=batch, seq_len=64, seed=seed)
    order = loader.order(0)
    assert sorted(order.tolist()) == list(range(loader.n_windows))
    again = PackedLoader(data_dir, "train", batch_size=batch, seq_len=64, seed=seed)
    assert torch.equal(loader.next_batch(), again.next_batch())
    assert not torch.equal(order, loader.order(1))  # a new order each epoch


def test_resumed_loader_continues_the_same_stream(data_dir):
    a = PackedLoader(data_dir, "train", batch_size=8, seq_len=16, seed=3)
    for _ in range(5):
        a.next_batch()
    b = PackedLoader(data_dir, "train", batch_size=8, seq_len=16, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(a.n_windows // 8 + 2):  # across an epoch boundary
        assert torch.equal(a.next_batch(), b.next_batch())


def test_ranks_split_the_global_batch(data_dir):
    whole = PackedLoader(data_dir, "train", batch_size=6, seq_len=16, seed=1).next_batch()
    parts = [PackedLoader(data_dir, "train", 6, 16, seed=1, rank=r, world_size=2).next_batch() for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_too_little_data_for_a_batch_says_what_to_change(data_dir):
    with pytest.raises(ValueError, match="smaller --batch-size or --seq-len"):
        PackedLoader(data_dir, "val", batch_size=10_000, seq_len=512)


def _documents(out, split: str, eos: int) -> list[list[int]]:
    meta = DataMeta.load(out)
    shards = [np.fromfile(out / shard["file"], dtype=meta.dtype) for shard in meta.shards[split]]
    stream = np.concatenate(shards).tolist()
    docs, current = [], []
    for token in stream:
        if token == eos:
            docs.append(current)
            current = []
        else:
            current.append(token)
    return docs


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_fim_documents_are_prefix_suffix_middle_rearrangements_at_the_asked_rate(tmp_path, tokenizer, rate):
    """A share `rate` of the training documents become <fim_begin>prefix<fim_hole>suffix<fim_end>middle (the
    layout /v1/completions builds for a suffix: one function, tokenizer.fim_ids), and put back in order
    each is the document's text; validation documents stay plain."""
    from nanoseek.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE

    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 3) for i in range(200)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    prepare([tmp_path / "docs.jsonl"], tokenizer, tmp_path / "out", val_permille=100, progress=False, fim_rate=rate)
    begin, hole, end = (tokenizer.special_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END))
    train = _documents(tmp_path / "out", "train", tokenizer.eos_id)
    fim = [d for d in train if d and d[0] == begin]
    assert len(fim) == pytest.approx(rate * len(train), abs=0.1 * len(train) if 0 < rate < 1 else 0)
    for doc in fim:
        assert doc.count(begin) == doc.count(hole) == doc.count(end) == 1
        prefix, suffix, middle = (
            doc[1 : doc.index(hole)],
            doc[doc.index(hole) + 1 : doc.index(end)],
            doc[doc.index(end) + 1 :],
        )
        assert tokenizer.decode(prefix + middle + suffix) in texts
        assert doc == tokenizer.fim_ids(tokenizer.decode(prefix), tokenizer.decode(suffix), tokenizer.decode(middle))
    assert not any(d and d[0] == begin for d in _documents(tmp_path / "out", "val", tokenizer.eos_id))
