"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with DeepSeek-V3's special tokens and chat format.

    nanoseek tokenizer train --input corpus/ --vocab-size 4096 --out tok/

`load_tokenizer` reads ours or any Hugging Face tokenizer.json / tokenizer folder (DeepSeek's own
129,280-token vocabulary included). The chat format is DeepSeek-V3's:
`<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{reply}<｜end▁of▁sentence｜>...`.
"""

from __future__ import annotations

import functools
import json
import re
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
# Tool use, DeepSeek-V3's: calls <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
# \n```json\nARGS\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>; results <｜tool▁outputs▁begin｜>
# <｜tool▁output▁begin｜>...<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>.
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOL_TOKENS = [
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_SEP,
    TOOL_OUTPUTS_BEGIN,
    TOOL_OUTPUTS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
]
# bos 0, eos 1 as V3
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK, FIM_BEGIN, FIM_HOLE, FIM_END, *TOOL_TOKENS]
ROLES = ("system", "user", "assistant", "tool")
SPECIAL, TEXT, MARKUP = "special", "text", "markup"  # how a part of a chat is encoded (see chat_parts)

# The same format as a Jinja template, for transformers' AutoTokenizer.apply_chat_template (and through it
# vLLM and SGLang): tools, tool calls and results, and the `thinking` switch included; transformers itself
# handles continue_final_message.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages | selectattr('role', 'equalto', 'system') %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ m['content'] or '' }}{% endfor %}"
    "{% if tools %}{{ '\\n\\n## Tools\\nYou have access to the following tools:\\n' }}"
    "{% for tool in tools %}{% set f = tool['function'] %}"
    "{{ '\\n### ' + f['name'] + '\\nDescription: ' + (f['description'] if f['description'] is defined else '')"
    " + '\\n\\nParameters: ' + ((f['parameters'] if f['parameters'] is defined else {}) | tojson) + '\\n' }}"
    "{% endfor %}"
    "{{ '\\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
    "function<｜tool▁sep｜>tool_call_name\\n```json\\ntool_call_arguments\\n```<｜tool▁call▁end｜>"
    "<｜tool▁calls▁end｜>\\n' }}"
    "{% endif %}"
    "{% set ns = namespace(previous='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + (m['content'] or '') }}"
    "{% elif m['role'] == 'tool' %}"
    "{{ ('<｜tool▁outputs▁begin｜>' if ns.previous != 'tool' else '\\n') + '<｜tool▁output▁begin｜>'"
    " + (m['content'] or '') + '<｜tool▁output▁end｜>' }}"
    "{% elif m['role'] == 'assistant' %}"
    "{{ ('<｜tool▁outputs▁end｜>' if ns.previous == 'tool' else '<｜Assistant｜>') + (m['content'] or '') }}"
    "{% if m['tool_calls'] %}{{ '<｜tool▁calls▁begin｜>' }}{% for c in m['tool_calls'] %}"
    "{{ ('' if loop.first else '\\n') + '<｜tool▁call▁begin｜>' + (c['type'] or 'function') + '<｜tool▁sep｜>'"
    " + c['function']['name'] + '\\n```json\\n' + c['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}"
    "{% endfor %}{{ '<｜tool▁calls▁end｜>' }}{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% if m['role'] != 'system' %}{% set ns.previous = m['role'] %}{% endif %}"
    "{% endfor %}"
    "{% if ns.previous == 'tool' %}{{ '<｜tool▁outputs▁end｜>' }}"
    "{% elif add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
    "{% if thinking is defined and thinking is not none and (add_generation_prompt or ns.previous == 'tool') %}"
    "{{ '<think>' if thinking else '</think>' }}{% endif %}"
)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character map (the ByteLevel pre-tokenizer's), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_OF = _byte_alphabet()


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

    def token_bytes(self, token: int) -> bytes:
        """A token's own raw bytes (part of a character, for a character split over tokens): byte-level BPE
        spells each byte as one character of GPT-2's byte alphabet; a special token is its UTF-8 text."""
        piece = self.tok.id_to_token(token) or ""
        if piece in self._specials or not self._byte_level:
            return self.decode([token]).encode()
        return bytes(_BYTE_OF[c] for c in piece)

    @functools.cached_property
    def _specials(self) -> set[str]:
        return {t.content for t in self.tok.get_added_tokens_decoder().values()}

    @functools.cached_property
    def _byte_level(self) -> bool:
        return "ByteLevel" in json.dumps(json.loads(self.tok.to_str()).get("decoder"))

    def chat_parts(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        thinking: bool | None = None,
        continue_final_message: bool = False,
        tools: Sequence[dict] | None = None,
    ) -> list[tuple[str, str, bool]]:
        """DeepSeek-V3's chat format as (text, how it is encoded, is it the model's reply) parts: system
        prompts first (with the tools' descriptions after them), then the turns in order. A SPECIAL part is
        one special token; TEXT is plain text (system, user and tool contents, tool-call names and
        arguments: a special-token string typed there cannot open a turn); MARKUP is an assistant's own
        text, whose <think>...</think> stays special.
        thinking: the reply opens with <think> (True) or </think> (False, no reasoning), as DeepSeek's
        thinking switch; None leaves it to the model. continue_final_message: the last message, an
        assistant's, is left open for the reply to continue (DeepSeek's chat prefix completion). After
        tool results the reply follows them directly, without an <｜Assistant｜> marker (V3's template)."""
        for m in messages:
            if m.get("role") not in ROLES or not isinstance(m.get("content") or "", str):
                raise ValueError(f"each message needs a role {'/'.join(ROLES)} and a string content, got {m!r}")
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise ValueError("continue_final_message needs an assistant message last")
        # several system messages are one prompt, joined by a blank line (V3's template)
        system = "\n\n".join(m.get("content") or "" for m in messages if m["role"] == "system")
        parts = [(self.bos_token, SPECIAL, False), (system, TEXT, False)]
        parts += [(text, kind, False) for text, kind in tools_prompt_parts(tools or [])]
        previous = None
        for m in messages:
            role, content = m["role"], m.get("content") or ""
            if role == "user":
                parts += [(USER, SPECIAL, False), (content, TEXT, False)]
            elif role == "tool":
                opening = [(TOOL_OUTPUTS_BEGIN, SPECIAL, False)] if previous != "tool" else [("\n", TEXT, False)]
                parts += [
                    *opening,
                    (TOOL_OUTPUT_BEGIN, SPECIAL, False),
                    (content, TEXT, False),
                    (TOOL_OUTPUT_END, SPECIAL, False),
                ]
            elif role == "assistant":
                marker = TOOL_OUTPUTS_END if previous == "tool" else ASSISTANT
                parts += [(marker, SPECIAL, False), (content, MARKUP, True)]
                parts += [(text, kind, True) for text, kind in tool_call_parts(m.get("tool_calls") or [])]
                parts.append((self.eos_token, SPECIAL, True))
            previous = role if role != "system" else previous
        if continue_final_message:
            parts.pop()  # the reply continues the last message: no end of sentence
        elif previous == "tool":
            parts.append((TOOL_OUTPUTS_END, SPECIAL, False))
        elif add_generation_prompt:
            parts.append((ASSISTANT, SPECIAL, False))
        if thinking is not None and not continue_final_message and (add_generation_prompt or previous == "tool"):
            parts.append((THINK if thinking else END_THINK, SPECIAL, False))
        return parts

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        thinking: bool | None = None,
        continue_final_message: bool = False,
        tools: Sequence[dict] | None = None,
    ) -> str | list[int]:
        """The chat as text, or as token ids (see chat_parts)."""
        parts = self.chat_parts(messages, add_generation_prompt, thinking, continue_final_message, tools)
        if not tokenize:
            return "".join(text for text, _, _ in parts)
        return [i for text, kind, _ in parts for i in self.encode_part(text, kind)]

    def tool_results_ids(self, results: Sequence[str]) -> list[int]:
        """The tokens that follow an assistant's tool calls in the chat format: the tools' results, then the
        marker after which the reply goes on (what the template renders between the calls' end of sentence
        and the next reply, so a multi-turn rollout is the very sequence that SFT and serving see)."""
        parts = self.chat_parts([{"role": "tool", "content": r} for r in results])[2:]  # past BOS and system
        return [i for text, kind, _ in parts for i in self.encode_part(text, kind)]

    def encode_part(self, text: str, kind: str) -> list[int]:
        if kind == SPECIAL:
            return [self.special_id(text)]
        if kind == TEXT:
            return self.encode_text(text)
        # An assistant's own markup: <think> and </think> are the special tokens, and nothing else is (a
        # special-token string a reply copied from a tool result stays text when the reply is sent back).
        ids = []
        for piece in re.split(f"({re.escape(THINK)}|{re.escape(END_THINK)})", text):
            special = piece in (THINK, END_THINK) and self.tok.token_to_id(piece) is not None
            ids += [self.special_id(piece)] if special else self.encode_text(piece) if piece else []
        return ids

    def fim_ids(self, prefix: str, suffix: str, middle: str | None = None) -> list[int]:
        """Fill-in-the-middle in Prefix-Suffix-Middle order, as DeepSeek-V3 pretrains and as
        /v1/completions with `suffix` asks: <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>, then the
        middle when it is known (a training document). The texts are plain text: only this opens a hole."""
        ids = [
            self.special_id(FIM_BEGIN),
            *self.encode_text(prefix),
            self.special_id(FIM_HOLE),
            *self.encode_text(suffix),
            self.special_id(FIM_END),
        ]
        return ids if middle is None else ids + self.encode_text(middle)

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


def tools_prompt(tools: Sequence[dict]) -> str:
    """The tools' descriptions for the system prompt, and the call format, as text (tools_prompt_parts)."""
    return "".join(text for text, _ in tools_prompt_parts(tools))


def tools_prompt_parts(tools: Sequence[dict]) -> list[tuple[str, str]]:
    """The tools' descriptions and the call format as (text, kind) parts. Settled: DeepSeek-V3's own template
    renders no tool descriptions, so they follow V3.1's wording ("## Tools", "### name", "Description",
    "Parameters", "IMPORTANT: ALWAYS adhere..."), while the example call is V3's format (function<sep>name,
    arguments in a json fence), the one tool_call_parts renders, the grammar constrains and the parser reads.
    The descriptions are a client's text (plain text: they cannot open a turn); the example's markers are
    this server's own, one special token each, as DeepSeek's tokenizer reads the rendered template (and
    about 100 tokens shorter than spelling them out)."""
    if not tools:
        return []
    lines = ["\n\n## Tools\nYou have access to the following tools:\n"]
    for tool in tools:
        f = tool["function"]
        lines.append(
            f"### {f['name']}\nDescription: {f.get('description', '')}\n\n"
            f"Parameters: {json.dumps(f.get('parameters', {}), ensure_ascii=False)}\n"
        )
    lines.append("IMPORTANT: ALWAYS adhere to this exact format for tool use:\n")
    placeholder = {"type": "function", "function": {"name": "tool_call_name", "arguments": "tool_call_arguments"}}
    return [("\n".join(lines), TEXT), *tool_call_parts([placeholder]), ("\n", TEXT)]


def tool_call_parts(calls: Sequence[dict]) -> list[tuple[str, str]]:
    """An assistant's tool calls as (text, kind) parts of DeepSeek-V3's format."""
    if not calls:
        return []
    parts = [(TOOL_CALLS_BEGIN, SPECIAL)]
    for i, call in enumerate(calls):
        f = call["function"]
        parts += [("\n", TEXT)] if i else []
        parts += [
            (TOOL_CALL_BEGIN, SPECIAL),
            (call.get("type", "function"), TEXT),
            (TOOL_SEP, SPECIAL),
            (f"{f['name']}\n```json\n{f['arguments']}\n```", TEXT),
            (TOOL_CALL_END, SPECIAL),
        ]
    return [*parts, (TOOL_CALLS_END, SPECIAL)]


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


def _special_tokens(file: Path) -> tuple[str, str, str]:
    """(bos, eos, pad) from tokenizer_config.json if there is one, else nanoseek's; a file that is not a JSON
    object of them is named."""
    config: object = {}
    if file.is_file():
        try:
            config = json.loads(file.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            config = e
    fix = "fix it, or remove it to use nanoseek's special tokens"
    if not isinstance(config, dict):
        raise ValueError(f"{file} is not a JSON object of tokenizer settings ({config}): {fix}")
    tokens = []
    for name, default in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)):
        token = _token_text(config.get(name)) or default
        if not isinstance(token, str):
            raise ValueError(f'{file}: {name} must be a string or {{"content": a string}}, got {token!r}: {fix}')
        tokens.append(token)
    return tokens[0], tokens[1], tokens[2]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json file or a folder holding one (and, optionally, tokenizer_config.json). A file
    that is not a tokenizer, or lacks its special tokens, is a ValueError that names it."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}: train one with `nanoseek tokenizer train`")
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises bare Exceptions for a file it cannot read
        raise ValueError(
            f"{file} is not a tokenizer ({e}): copy the model's own tokenizer.json, or train one with "
            "`nanoseek tokenizer train`"
        ) from None
    bos, eos, pad = _special_tokens(file.with_name("tokenizer_config.json"))
    try:
        return Tokenizer(tok, bos_token=bos, eos_token=eos, pad_token=pad)
    except ValueError as e:  # a special token the vocabulary lacks: say which file
        raise ValueError(f"{file}: {e} (name the right one in tokenizer_config.json)") from None
