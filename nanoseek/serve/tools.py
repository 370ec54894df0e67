"""Tool calls in DeepSeek-V3's format, read back from a reply's tokens into OpenAI's `tool_calls`.

A reply calls tools from its <｜tool▁calls▁begin｜> token on: each call is
<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```<｜tool▁call▁end｜> (vLLM's
DeepSeek-V3 parser reads the same). The structure is special tokens, so calls are found by token id,
and only the text between them is decoded (the tokens after the calls begin, not the whole reply).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from nanoseek.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, Tokenizer

_FENCED = re.compile(r"^(?P<name>[^\n]*)\n```(?:json)?\n(?P<arguments>.*)\n```$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it

    def to_openai(self, index: int, request_id: str, with_index: bool = False) -> dict:
        """OpenAI's shape; the id is the same in every chunk and response of one request."""
        call_id = "call_" + hashlib.blake2b(f"{request_id}/{index}".encode(), digest_size=12).hexdigest()
        call = {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": index, **call} if with_index else call


def parse_tool_calls(tokenizer: Tokenizer, ids: list[int]) -> list[ToolCall]:
    """The complete calls in the tokens after <｜tool▁calls▁begin｜> (an unfinished last one waits)."""
    begin, sep, end = (tokenizer.special_id(t) for t in (TOOL_CALL_BEGIN, TOOL_SEP, TOOL_CALL_END))
    calls, start = [], None
    for i, token in enumerate(ids):
        if token == begin:
            start = i
        elif token == end and start is not None:
            body = ids[start + 1 : i]
            head, tail = (body[: body.index(sep)], body[body.index(sep) + 1 :]) if sep in body else ([], body)
            text = tokenizer.decode(tail, skip_special_tokens=True).strip()
            match = _FENCED.match(text)
            if match and tokenizer.decode(head).strip() in ("", "function"):  # OpenAI's API has function calls only
                calls.append(ToolCall(match["name"].strip(), match["arguments"].strip()))
            start = None
    return calls
