"""Grammar-constrained decoding with llguidance: JSON output (any object, or a JSON Schema) and well-formed
tool calls in DeepSeek-V3's format, each token masked to what the grammar allows.

A request's grammar is Lark text (llguidance's dialect, which embeds JSON Schemas with `%json {...}` and
names special tokens by id, `<[42]>`): special tokens are structure (the `</think>` that ends reasoning,
the tool-call markers), text between them is bytes. One matcher per request follows its tokens; MTP drafts
are checked against it before they are verified (a draft that leaves the grammar is cut there), and the
verifier's logits at each draft position are masked as that position's grammar state allows.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from nanoseek.tokenizer import (
    END_THINK,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    Tokenizer,
)

# JSON as a model writes it, with a space after ':' and ',' or none; never the unbounded runs of
# whitespace that flexible JSON allows (an untrained model would fill its budget with them).
JSON_STYLE = {"whitespace_pattern": "[ ]?"}
ANY_TEXT = r"/(.|\n)*/"


def json_schema_rule(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


def closed(schema: object) -> object:
    """A strict function's schema, as OpenAI's strict mode reads it: every object holds its declared keys
    only (additionalProperties false where the schema leaves it open), nested schemas included."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if isinstance(v, (dict, list)) else v for k, v in schema.items()}
    if "properties" in out and isinstance(out["properties"], dict):  # a map of names, each one a schema
        out["properties"] = {name: closed(s) for name, s in schema["properties"].items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def special(tokenizer: Tokenizer, token: str) -> str:
    return f"<[{tokenizer.special_id(token)}]>"


def json_grammar(tokenizer: Tokenizer, schema: dict | None, reasoning: bool) -> str:
    """A JSON value under `schema` (any object when None); after the reasoning when the reply reasons
    first: the constraint starts at </think>."""
    lines = [f"start: {ANY_TEXT} {special(tokenizer, END_THINK)} answer" if reasoning else "start: answer"]
    lines.append(f"answer: {json_schema_rule(schema if schema is not None else {'type': 'object'})}")
    return "\n".join(lines)


def tool_grammar(tokenizer: Tokenizer, tools: Sequence[dict], mode: str, parallel: bool, reasoning: bool) -> str:
    """Tool calls in DeepSeek-V3's format whose arguments validate against their function's parameters.
    mode "required": the reply is one or more calls; a function's name: one call of it; "auto": text, or
    text then calls (used when some function is `strict`)."""
    if mode not in ("auto", "required"):
        tools = [t for t in tools if t["function"]["name"] == mode]
    functions = []
    for i, tool in enumerate(tools):
        f = tool["function"]
        head = json.dumps(f"{f['name']}\n```json\n")  # the name and the fence, as one Lark string
        schema = f.get("parameters") or {"type": "object"}
        schema = closed(schema) if f.get("strict") else schema
        functions.append(f'f{i}: {head} {json_schema_rule(schema)} "\\n```"')
    more = ' ("\\n" call)*' if parallel and mode in ("auto", "required") else ""
    begin, end = special(tokenizer, TOOL_CALLS_BEGIN), special(tokenizer, TOOL_CALLS_END)
    call, sep, call_end = (
        special(tokenizer, TOOL_CALL_BEGIN),
        special(tokenizer, TOOL_SEP),
        special(tokenizer, TOOL_CALL_END),
    )
    lines = [
        f"start: {ANY_TEXT} {special(tokenizer, END_THINK)} answer" if reasoning else "start: answer",
        "answer: TEXT | TEXT? calls" if mode == "auto" else "answer: calls",
        "TEXT: /(.|\\n)+/",
        f"calls: {begin} call{more} {end}",
        f'call: {call} "function" {sep} ({" | ".join(f"f{i}" for i in range(len(tools)))}) {call_end}',
        *functions,
    ]
    return "\n".join(lines)


class Grammars:
    """Matchers for one tokenizer and model vocabulary (the mask covers the model's padded rows too).
    Compiled grammars are kept (least recently used of CACHED go): a request gets a copy of its grammar's
    matcher, so n choices, or the same schema sent again, compile once. Thread-safe: the server compiles
    off its event loop while the engine thread copies."""

    CACHED = 64

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._ll = self._executor = None
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll is None:  # ms for a small vocabulary, about a second for DeepSeek's 129k: once
                from llguidance import LLTokenizer

                n = max(self.vocab_size, self.tokenizer.vocab_size)
                self._ll = LLTokenizer(self.tokenizer.tok.to_str(), n_vocab=n, eos_token=self.tokenizer.eos_id)
            return self._ll

    def matcher(self, grammar: str):
        """A matcher at the grammar's start; ValueError with llguidance's reason if it cannot compile."""
        from llguidance import LLMatcher, LLParserLimits

        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
        limits = LLParserLimits(verbose_errors=False)
        compiled = LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=limits)
        if compiled.is_error():
            raise ValueError(compiled.get_error())
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > self.CACHED:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def mask_(self, logits: torch.Tensor, matchers: Sequence) -> None:
        """Rows of logits [n, V] that their matchers (one per row, None: free) do not allow go to -inf."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        import llguidance.torch as lgt

        bitmask = lgt.allocate_token_bitmask(len(rows), self.ll_tokenizer.vocab_size)
        for j, i in enumerate(rows):
            lgt.fill_next_token_bitmask(matchers[i], bitmask, j)
        logits[rows] = apply_bitmask(logits[rows], bitmask)

    def draft_masks_(self, logits: torch.Tensor, matcher, drafts: list[int]) -> None:
        """logits [1 + k, V] of a row with k valid drafts: position j masked as the grammar stands after
        drafts[:j] (the matcher is left where it was)."""
        import llguidance.torch as lgt
        from llguidance import LLExecutor

        if self._executor is None:
            self._executor = LLExecutor(1)
        bitmask = lgt.allocate_token_bitmask(len(drafts) + 1, self.ll_tokenizer.vocab_size)
        lgt.fill_next_token_bitmask_par_with_draft_tokens(self._executor, [(matcher, 0, drafts)], bitmask)
        logits.copy_(apply_bitmask(logits, bitmask))


_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [n, V] with the tokens whose bit is 0 at -inf. llguidance's own apply is `torch.compile`d
    (a 14 s first call on a CPU); this is the same in four eager ops."""
    allowed = ((bitmask.to(logits.device).unsqueeze(-1) >> _SHIFTS.to(logits.device)) & 1).bool().flatten(1)
    allowed = allowed[:, : logits.shape[-1]]
    out = torch.full_like(logits, float("-inf"))
    out[:, : allowed.shape[-1]] = logits[:, : allowed.shape[-1]].masked_fill(~allowed, float("-inf"))
    return out
