"""A request's text, grown one token at a time in O(1) per token: incremental detokenisation and stop
strings searched in the tail only. One implementation for `Engine.stream`, `Engine.generate` and the API.

Decoding a byte-level BPE token alone can give half a character, and a SentencePiece-style token's leading
space depends on what comes before it; so each step decodes a short window of recent tokens twice, with
and without the new ones, and keeps the difference (the offsets technique of Hugging Face's
text-generation-inference and vLLM). A window that ends in an incomplete character waits for more tokens.
"""

from __future__ import annotations

from nanoseek.tokenizer import END_THINK, THINK, TOOL_CALLS_BEGIN, Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence
MAX_PENDING = 32  # tokens a window may stay open for a character to complete; then its U+FFFD is final


def releasable(text: str, hold: int) -> int:
    """How much of a growing text can be streamed: the last `hold` characters wait, since a stop string
    (of hold + 1 characters at most) may still be forming, and so does a half-decoded character."""
    return len(text.rstrip(REPLACEMENT)) - hold


class TextOutput:
    """The text of one request's output tokens, its stop-string cut, and where its reasoning ends."""

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str], reasoning: bool = False):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # characters a stop string may still claim
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # token offsets: the window starts at _prefix; _read ends the decoded part
        self._sent = 0  # characters of the open window (past `_read`) already in text
        ids = [tokenizer.tok.token_to_id(t) for t in (THINK, END_THINK, TOOL_CALLS_BEGIN)] if tokenizer else []
        self.think, self.end_think, self.tool_calls_begin = ids or (None, None, None)
        self.reasoning = reasoning  # the prompt opened <think> (R1's template)
        self.reasoning_end: int | None = None  # characters of reasoning, once </think> came
        self.reasoning_tokens = 0
        self.stopped = False  # a stop string was found; text is cut before it
        # Where the reply's tool calls begin, once they do (after any reasoning): (characters, tokens) before.
        self.tool_calls_at: tuple[int, int] | None = None

    def add(self, token: int) -> str:
        """Take one token; returns the text it completed (empty while a character is half-decoded)."""
        if not self.ids and token == self.think:
            self.reasoning = True
        self.ids.append(token)
        answering = not self.reasoning or self.reasoning_end is not None
        if token == self.tool_calls_begin and self.tool_calls_at is None and answering:
            # The text before the calls is whole: nothing of it waits.
            new = self._decode(final=True)
            self.tool_calls_at = (len(self.text), len(self.ids) - 1)
            return new
        if self.reasoning and self.reasoning_end is None:
            self.reasoning_tokens += 1
            if token == self.end_think:  # the reasoning is whole: no character of it waits
                new = self._decode(final=True)
                self.reasoning_end = len(self.text)
                return new
        return self._decode(final=False)

    def flush(self) -> str:
        """The request is over: take the text still held back (an incomplete character stays U+FFFD)."""
        return self._decode(final=True)

    def _decode(self, final: bool) -> str:
        if self.tokenizer is None or self.stopped or self._read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        window = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        # Tokens can end inside a character (U+FFFD) for several tokens in a row while each character still
        # completes: send what is whole, keep the window open; only after MAX_PENDING tokens is a U+FFFD final.
        complete = window.rstrip(REPLACEMENT)
        if not final and len(complete) < len(window) and len(self.ids) - self._read < MAX_PENDING:
            new = complete[len(before) + self._sent :]
            self._sent += len(new)
        else:
            new = window[len(before) + self._sent :]
            self._prefix, self._read, self._sent = self._read, len(self.ids), 0
        if not new:
            return ""
        start = len(self.text)
        self.text += new
        self._cut_at_stop(start)
        return self.text[start:]

    def _cut_at_stop(self, new_start: int) -> None:
        """A stop string can only end in the new text: search from hold characters before it. Inside tool
        calls (their names and JSON arguments) a stop string is data: a call is never cut."""
        if not self.stop or self.tool_calls_at is not None:
            return
        tail = max(0, new_start - self.hold)
        found = [i for i in (self.text.find(s, tail) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True

    @property
    def reasoning_text(self) -> str:
        if not self.reasoning:
            return ""
        return self.text[: self.reasoning_end] if self.reasoning_end is not None else self.text

    @property
    def content(self) -> str:
        if not self.reasoning:
            return self.text
        return self.text[self.reasoning_end :] if self.reasoning_end is not None else ""
