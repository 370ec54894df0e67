"""Token shards and packed batches.

    nanoseek data prepare --input corpus/ notes.jsonl 'web/*.parquet' --tokenizer tok/ --out data/

`prepare` tokenises text files, JSONL (a `text` field) and parquet files (a `text` column) into flat
uint16/uint32 memmap shards, one document after another, each followed by EOS; a seeded ~1% of the
documents go to the validation split. `PackedLoader` cuts the stream into fixed windows of seq_len + 1
tokens (documents packed back to back, as in GPT-style pretraining), visits them in a seeded random
order per epoch, and saves and restores its position exactly.

With no data of its own, nanoseek trains on the Python standard library's source (`stdlib_files`), which
every Python installation ships: a small model learns to write Python, with nothing to download.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.atomic import atomic_dir
from nanoseek.config import IGNORE
from nanoseek.flags import flag
from nanoseek.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, Tokenizer, train_tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".c", ".h", ".js", ".ts", ".html", ".css", ".json", ".toml"}
SHARD_TOKENS = 100_000_000
META = "meta.json"


# --- reading documents ----------------------------------------------------------------------------
def expand_inputs(inputs: list[str]) -> list[Path]:
    """Paths, globs and folders (searched recursively for text, .jsonl and .parquet files), in order."""
    files: list[Path] = []
    for item in inputs:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for path in matches:
            if path.is_dir():
                files += sorted(p for p in path.rglob("*") if p.is_file() and _readable_suffix(p))
            elif path.is_file():
                files.append(path)
            else:
                raise FileNotFoundError(f"input {item!r} matches no file or folder")
    return files


def _readable_suffix(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES or path.suffix in (".jsonl", ".parquet")


def read_documents(path: Path) -> Iterator[str]:
    """One document per text file, per JSONL line (`text` field) or per parquet row (`text` column)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ValueError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
        yield from (t for t in table.column("text").to_pylist() if t)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
            "convert it to UTF-8 or leave it out"
        ) from None
    if path.suffix != ".jsonl":
        if text.strip():
            yield text
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{n} needs a string field 'text'")
        if record["text"]:
            yield record["text"]


def stdlib_files() -> list[Path]:
    """The embedded default corpus: the standard library's own .py files, without its test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    return [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts)]


def iter_texts(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield from read_documents(path)


# --- writing shards -------------------------------------------------------------------------------
@dataclass(slots=True)
class DataMeta:
    dtype: str
    vocab_size: int
    eos_id: int
    shards: dict[str, list[dict]] = field(default_factory=dict)  # split -> [{"file", "tokens"}]
    documents: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, data_dir: Path) -> DataMeta:
        path = Path(data_dir) / META
        if not path.is_file():
            raise FileNotFoundError(f"no {META} in {data_dir}: create the data with `nanoseek data prepare`")
        return cls(**json.loads(path.read_text()))


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype):
        self.out, self.split, self.dtype = out, split, dtype
        self.shards: list[dict] = []
        self.file = None

    def write(self, ids: list[int]) -> None:
        if self.file is None or self.shards[-1]["tokens"] + len(ids) > SHARD_TOKENS:
            self._open()
        np.asarray(ids, dtype=self.dtype).tofile(self.file)
        self.shards[-1]["tokens"] += len(ids)

    def _open(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self.file = open(self.out / name, "wb")  # noqa: SIM115 (kept open across writes)
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _is_val(doc_index: int, seed: int, val_permille: int) -> bool:
    digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % 1000 < val_permille


FIM_RATE = 0.1  # DeepSeek-V3's share of pretraining documents turned into fill-in-the-middle (PSM) ones


def fim_document(tokenizer: Tokenizer, text: str, rng: random.Random) -> list[int]:
    """A document as a fill-in-the-middle example: cut at two random characters into prefix, middle and
    suffix, laid out as tokenizer.fim_ids does for /v1/completions with `suffix` (one format for both)."""
    i, j = sorted(rng.randint(0, len(text)) for _ in range(2))
    return tokenizer.fim_ids(text[:i], text[j:], text[i:j])


def prepare(
    files: list[Path],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    seed: int = 0,
    val_permille: int = 10,
    batch_docs: int = 256,
    progress: bool = True,
    fim_rate: float = FIM_RATE,
) -> DataMeta:
    """Tokenise documents into train/val shards under out_dir; returns what meta.json records. A share
    fim_rate of the training documents becomes fill-in-the-middle examples (validation stays plain text,
    so validation losses compare across rates)."""
    if fim_rate and any(tokenizer.tok.token_to_id(t) is None for t in (FIM_BEGIN, FIM_HOLE, FIM_END)):
        raise ValueError(
            "--fim-rate needs a tokenizer with DeepSeek's fill-in-the-middle tokens (nanoseek's have "
            "them); prepare with --fim-rate 0 for this one"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    writers = {split: _ShardWriter(out, split, dtype) for split in ("train", "val")}
    counts = {"train": 0, "val": 0}
    batch: list[str] = []
    n_docs = 0

    pending: list[tuple[str, str, list[int]]] = []  # the last document, held back so val is never empty

    rng = random.Random(seed)

    def emit(split: str, text: str, ids: list[int]) -> None:
        counts[split] += 1
        if split == "train" and fim_rate and rng.random() < fim_rate:  # decided here: validation stays plain
            ids = fim_document(tokenizer, text, rng)
        writers[split].write([*ids, tokenizer.eos_id])

    def flush() -> None:
        for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
            if pending:
                emit(*pending.pop())
            index = counts["train"] + counts["val"]
            pending.append(("val" if _is_val(index, seed, val_permille) else "train", text, ids))
        batch.clear()

    for path in tqdm(files, desc="tokenising", unit="file", disable=not progress):
        for text in read_documents(path):
            batch.append(text)
            n_docs += 1
            if len(batch) >= batch_docs:
                flush()
    flush()
    if pending:
        split, text, ids = pending.pop()
        emit("val" if val_permille and counts["val"] == 0 and counts["train"] else split, text, ids)
    for w in writers.values():
        w.close()
    if n_docs == 0:
        raise ValueError(f"no text in {len(files)} input file(s): nothing to train on")
    if n_docs < 2:
        raise ValueError("one document is too few for a train/val split: add more text")
    meta = DataMeta(
        dtype=np.dtype(dtype).name,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        shards={s: w.shards for s, w in writers.items()},
        documents=counts,
    )
    (out / META).write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta


def cache_dir() -> Path:
    return Path(os.environ.get("NANOSEEK_CACHE", Path.home() / ".cache" / "nanoseek"))


def ensure_default_data(vocab_size: int, progress: bool = True) -> Path:
    """The embedded default, built once and cached: a BPE of vocab_size trained on the stdlib source,
    and the stdlib tokenised with it (tokenizer in <dir>/tokenizer, shards beside it)."""
    out = cache_dir() / f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-v{vocab_size}-fim{FIM_RATE}"
    if (out / META).is_file():
        return out
    files = stdlib_files()
    if progress:
        print(f"preparing the default corpus: {len(files)} stdlib files -> {out}", file=sys.stderr)
    if out.is_dir() and not (out / META).is_file():  # unfinished, left under the final name by an older nanoseek
        shutil.rmtree(out)
    # Several processes may build it at once: each under its own name, and the first one done wins.
    with atomic_dir(out, replace=False) as tmp:
        tokenizer = train_tokenizer(iter_texts(files), vocab_size, show_progress=progress)
        tokenizer.save(tmp / "tokenizer")
        prepare(files, tokenizer, tmp, progress=progress)
    return out


# --- packed batches -------------------------------------------------------------------------------
class PackedLoader:
    """Windows of seq_len + 1 tokens from the shards of one split, in a seeded order per epoch.

    Each call returns this rank's rows of one global batch: with world_size ranks every rank reads
    batch_size / world_size rows, so 1 or N processes see the same data per step.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        meta = DataMeta.load(Path(data_dir))
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the world size {world_size}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.shards = [
            np.memmap(Path(data_dir) / s["file"], dtype=meta.dtype, mode="r")
            for s in meta.shards.get(split, [])
            if s["tokens"] > seq_len
        ]
        windows = torch.tensor([(len(s) - 1) // seq_len for s in self.shards], dtype=torch.long)
        self.first_window = torch.cat((torch.zeros(1, dtype=torch.long), windows.cumsum(0)))
        self.n_windows = int(self.first_window[-1])
        if self.n_windows < batch_size:
            raise ValueError(
                f"the {split} split of {data_dir} holds {self.n_windows} windows of {seq_len + 1} tokens, "
                f"fewer than one batch of {batch_size}: use more data, a smaller --batch-size or --seq-len"
            )
        self.epoch, self.cursor = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    @staticmethod
    def count_windows(data_dir: str | Path, split: str, seq_len: int) -> int:
        meta = DataMeta.load(Path(data_dir))
        return sum((s["tokens"] - 1) // seq_len for s in meta.shards.get(split, []) if s["tokens"] > seq_len)

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n_windows, generator=g) if self.shuffle else torch.arange(self.n_windows)
            self._order = (epoch, perm)
        return self._order[1]

    def window(self, index: int) -> torch.Tensor:
        shard = int(torch.searchsorted(self.first_window, index, right=True)) - 1
        start = (index - int(self.first_window[shard])) * self.seq_len
        return torch.from_numpy(self.shards[shard][start : start + self.seq_len + 1].astype(np.int64))

    def next_batch(self) -> torch.Tensor:
        """[batch_size / world_size, seq_len + 1] int64 token ids."""
        if self.cursor + self.batch_size > self.n_windows:  # drop the ragged end of the epoch
            self.epoch, self.cursor = self.epoch + 1, 0
        ids = self.order(self.epoch)[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        per_rank = self.batch_size // self.world_size
        mine = ids[self.rank * per_rank : (self.rank + 1) * per_rank]
        return torch.stack([self.window(int(i)) for i in mine])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


# --- chat examples for supervised fine-tuning ------------------------------------------------------


def sft_row(messages: list[dict], tools: list[dict] | None = None) -> str:
    """One line of the chat JSONL that `nanoseek sft` reads (OpenAI's fine-tuning shape): the messages, and
    the tools they may call."""
    return json.dumps({"messages": messages} | ({"tools": tools} if tools else {})) + "\n"


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None
) -> tuple[list[int], list[bool]]:
    """The chat template's token ids (tokenizer.apply_chat_template without a generation prompt) and
    which of them are trained on: each assistant reply (its tool calls too) and its end-of-sentence token."""
    ids: list[int] = []
    trained: list[bool] = []
    for text, kind, reply in tokenizer.chat_parts(messages, add_generation_prompt=False, tools=tools):
        part = tokenizer.encode_part(text, kind)
        ids += part
        trained += [reply] * len(part)
    return ids, trained


def read_chat_jsonl(path: str | Path) -> list[tuple[list[dict], list[dict] | None]]:
    """OpenAI-style chat examples, one {"messages": [...]} per line, with the tools they may call
    ("tools": [...], as OpenAI's fine-tuning format): (messages, tools) pairs."""
    examples = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages, tools = row["messages"], row.get("tools")
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
            if tools is not None and not isinstance(tools, list):
                raise ValueError("tools must be a list of {type: function, function: {name, parameters}}")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f'{path}:{number}: expected {{"messages": [{{"role", "content"}}, ...]}} ({e})') from e
        examples.append((messages, tools))
    if not examples:
        raise ValueError(f"{path} holds no chat examples")
    return examples


class ChatLoader:
    """Padded batches of chat examples with labels on assistant tokens only (IGNORE elsewhere), from a
    seeded order per epoch; the same state and rank API as PackedLoader. Examples are cut to seq_len + 1
    tokens; padding (rather than packing) keeps examples from attending to each other. A held-out split
    ('val', val_permille of the examples by hash, at least one) measures the fine-tuned loss."""

    def __init__(
        self,
        path: str | Path,
        tokenizer: Tokenizer,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        val_permille: int = 50,
    ):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the world size {world_size}")
        examples = read_chat_jsonl(path)
        keys = [
            int.from_bytes(hashlib.blake2b(json.dumps(m).encode(), digest_size=4).digest(), "big") % 1000
            for m, _ in examples
        ]
        val = {i for i, k in enumerate(keys) if k < val_permille} or {min(range(len(keys)), key=keys.__getitem__)}
        if len(examples) == 1:
            val = set()
        chosen = [m for i, m in enumerate(examples) if (i in val) == (split == "val")]
        self.items: list[tuple[list[int], list[int]]] = []
        self.prompts: list[list[dict[str, str]]] = []  # each example up to its first reply, for samples
        for messages, tools in chosen:
            try:
                ids, trained = encode_chat(tokenizer, messages, tools)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(
                    f"{path}: a chat example does not fit the chat format ({type(e).__name__}: {e}): "
                    f"{json.dumps(messages)[:200]}"
                ) from None
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
            if any(trained[1:]):
                self.items.append((ids, [t if keep else IGNORE for t, keep in zip(ids, trained, strict=True)]))
                first_reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
                self.prompts.append(messages[:first_reply])
        self.n_windows = len(self.items)
        if self.n_windows < batch_size:
            raise ValueError(
                f"the {split} split of {path} holds {self.n_windows} usable chat examples, fewer than "
                f"one batch of {batch_size}: add examples or lower --batch-size"
            )
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.pad_id = rank, world_size, tokenizer.pad_id
        self.epoch, self.cursor = 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels), each [batch_size / world_size, longest + 1] int64."""
        if self.cursor + self.batch_size > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n_windows, generator=g) if self.shuffle else torch.arange(self.n_windows)
        chosen = order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        per_rank = self.batch_size // self.world_size
        rows = [self.items[int(i)] for i in chosen[self.rank * per_rank : (self.rank + 1) * per_rank]]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for row, (x, y) in enumerate(rows):
            ids[row, : len(x)], labels[row, : len(y)] = torch.tensor(x), torch.tensor(y)
        return ids, labels

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


# --- the commands: `nanoseek tokenizer train` and `nanoseek data prepare` -----------------------------------
@dataclass(slots=True)
class TokenizerTrainConfig:
    """Train a byte-level BPE on text files."""

    input: list[str] = flag("files, folders or globs", metavar="PATH")
    vocab_size: int = flag("tokens in the vocabulary", metavar="N")
    out: str = flag("the tokenizer folder to write", metavar="DIR")


def train_tokenizer_files(cfg: TokenizerTrainConfig) -> int:
    files = expand_inputs(cfg.input)
    tokenizer = train_tokenizer(iter_texts(files), cfg.vocab_size)
    tokenizer.save(cfg.out)
    print(f"trained a {tokenizer.vocab_size}-token BPE on {len(files)} file(s) -> {cfg.out}")
    return 0


@dataclass(slots=True)
class PrepareConfig:
    """Tokenise text, JSONL ('text') and parquet ('text') into memmap shards."""

    input: list[str] = flag("files, folders or globs", metavar="PATH")
    tokenizer: str = flag("tokenizer folder or tokenizer.json", metavar="DIR")
    out: str = flag("the data folder to write", metavar="DIR")
    seed: int = flag("seed of the train/val split", default=0)
    val_permille: int = flag("documents per 1000 kept for validation", default=10)
    fim_rate: float = flag(
        "share of training documents turned into fill-in-the-middle examples, prefix-suffix-middle (DeepSeek-V3's)",
        default=FIM_RATE,
    )


def prepare_files(cfg: PrepareConfig) -> int:
    from nanoseek.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer)
    files = expand_inputs(cfg.input)
    meta = prepare(files, tokenizer, cfg.out, seed=cfg.seed, val_permille=cfg.val_permille, fim_rate=cfg.fim_rate)
    tokenizer.save(f"{cfg.out}/tokenizer")  # the data remembers how it was tokenised
    tokens = {split: sum(s["tokens"] for s in shards) for split, shards in meta.shards.items()}
    print(f"{meta.documents} documents, {tokens} tokens ({meta.dtype}) -> {cfg.out}")
    return 0
