"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with DeepSeek-V3's special tokens and chat format.

    nanoseek tokenizer train --input corpus/ --vocab-size 4096 --out tok/

`load_tokenizer` reads ours or any Hugging Face tokenizer.json / tokenizer folder (DeepSeek's own
129,280-token vocabulary included). The chat format is DeepSeek-V3's:
`<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{reply}<｜end▁of▁sentence｜>...`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"  # fill-in-the-middle, PSM order
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK, FIM_BEGIN, FIM_HOLE, FIM_END]  # bos 0, eos 1 as V3

# The same format as a Jinja template, for transformers' AutoTokenizer.apply_chat_template.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


class Tokenizer:
    """A thin wrapper: encode/decode, the chat template, and the ids the trainer and engine need."""

    def __init__(self, tok: HFTokenizer, bos_token: str = BOS, eos_token: str = EOS, pad_token: str | None = PAD):
        self.tok = tok
        self._plain: HFTokenizer | None = None
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token if pad_token is not None and tok.token_to_id(pad_token) is not None else None
        for name, token in (("bos", bos_token), ("eos", eos_token)):
            if tok.token_to_id(token) is None:
                raise ValueError(f"the tokenizer has no {name} token {token!r}")

    @property
    def bos_id(self) -> int:
        return self.tok.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.tok.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.tok.token_to_id(self.pad_token) if self.pad_token else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text to ids, special-token strings included as the special tokens (for text we wrote)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Text to ids as plain text: a special-token string typed by a user becomes ordinary tokens, so
        that only the chat template can open a turn (no prompt injection past the system prompt)."""
        if self._plain is None:  # a second tokenizer object: the flag is not safe to flip under threads
            plain = HFTokenizer.from_str(self.tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        # encode_batch lets go of the GIL while it works (encode does not): a server's loop keeps answering.
        return self._plain.encode_batch([text], add_special_tokens=False)[0].ids

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """No token spans more bytes than this: a text of more than n times as many bytes has more than n tokens."""
        return max(len(token.encode()) for token in self.tok.get_vocab(with_added_tokens=True))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes on all cores (the Rust library parallelises batches)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = False,
        thinking: bool | None = None, continue_final_message: bool = False,
    ) -> str | list[int]:  # fmt: skip
        """DeepSeek-V3's chat format: system prompts first, then the turns in order. With tokenize=True,
        system and user contents are plain text (a special-token string typed there cannot open a turn);
        assistant contents keep the model's own markup (<think>...</think> of a reasoning reply).
        thinking: the reply opens with <think> (True) or </think> (False, no reasoning), as DeepSeek's
        thinking switch; None leaves it to the model. continue_final_message: the last message, an
        assistant's, is left open for the reply to continue (DeepSeek's chat prefix completion)."""
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"each message needs a role system/user/assistant and a string content, got {m!r}")
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise ValueError("continue_final_message needs an assistant message last")
        parts = [(self.bos_token, True), ("".join(m["content"] for m in messages if m["role"] == "system"), False)]
        for m in messages:
            if m["role"] == "user":
                parts += [(USER, True), (m["content"], False)]
            elif m["role"] == "assistant":
                parts += [(ASSISTANT, True), (m["content"], None), (self.eos_token, True)]
        if continue_final_message:
            parts.pop()  # the reply continues the last message: no end of sentence
        elif add_generation_prompt:
            parts.append((ASSISTANT, True))
            if thinking is not None:
                parts.append((THINK if thinking else END_THINK, True))
        if not tokenize:
            return "".join(text for text, _ in parts)
        encode = {True: lambda t: [self.special_id(t)], False: self.encode_text, None: self.encode}
        return [i for text, special in parts for i in encode[special](text)]

    def special_id(self, token: str) -> int:
        token_id = self.tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"this tokenizer has no {token!r} token")
        return token_id

    def save(self, out_dir: str | Path) -> None:
        """tokenizer.json plus a tokenizer_config.json that transformers' AutoTokenizer reads."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(out / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token or self.eos_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 131072,
            "chat_template": CHAT_TEMPLATE,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Byte-level BPE with digits split one by one (as DeepSeek's pre-tokenizer keeps numbers short)."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials plus the 256 bytes)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def _token_text(value: object) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts.
    return value.get("content") if isinstance(value, dict) else value  # type: ignore[return-value]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json file or a folder holding one (and, optionally, tokenizer_config.json)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}: train one with `nanoseek tokenizer train`")
    tok = HFTokenizer.from_file(str(file))
    config_file = file.with_name("tokenizer_config.json")
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    bos = _token_text(config.get("bos_token")) or BOS
    eos = _token_text(config.get("eos_token")) or EOS
    pad = _token_text(config.get("pad_token")) or PAD
    return Tokenizer(tok, bos_token=bos, eos_token=eos, pad_token=pad)
