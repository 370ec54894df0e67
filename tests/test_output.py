"""Incremental text: the same text as decoding everything at once, stop strings found in the tail, the
reasoning split at </think> (the cost per token, constant however long the text grows, is measured by
benchmarks/bench_output.py)."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from nanoseek.serve.output import TextOutput, releasable
from nanoseek.tokenizer import END_THINK, THINK


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=80))
@example(text="\ufffd")  # found by CI: a real replacement character at the end
def test_incremental_text_equals_decoding_the_whole_output(tokenizer, text):
    ids = tokenizer.encode_text(text)
    out = TextOutput(tokenizer, stop=[])
    # A trailing U+FFFD may be half a character until the request ends (flush): a real one (as in the text
    # "\ufffd") is released then.
    pieces = [out.add(i) for i in ids] + [out.flush()]
    assert out.text == "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_stop_string_cuts_the_text_even_across_tokens(tokenizer):
    out = TextOutput(tokenizer, stop=["STOP", "never"])
    for i in tokenizer.encode_text("def f(x): return xSTOP and more"):
        out.add(i)
        if out.stopped:
            break
    assert out.stopped and out.text == "def f(x): return x"


def test_reasoning_and_content_split_at_the_end_of_thinking(tokenizer):
    think, end = tokenizer.special_id(THINK), tokenizer.special_id(END_THINK)
    out = TextOutput(tokenizer, stop=[])
    ids = [think, *tokenizer.encode_text("add 2 and 2"), end, *tokenizer.encode_text("4")]
    for i in ids:
        out.add(i)
    assert (out.reasoning_text, out.content, out.reasoning_tokens) == ("add 2 and 2", "4", len(ids) - 1)
    opened = TextOutput(tokenizer, stop=[], reasoning=True)  # R1's template ends the prompt with <think>
    for i in tokenizer.encode_text("still thinking"):
        opened.add(i)
    assert (opened.reasoning_text, opened.content) == ("still thinking", "")
    plain = TextOutput(tokenizer, stop=[])
    for i in tokenizer.encode_text("4"):
        plain.add(i)
    assert (plain.reasoning_text, plain.content, plain.reasoning_tokens) == ("", "4", 0)


def test_releasable_holds_back_what_a_stop_string_or_half_a_character_may_still_change():
    assert releasable("hello wor", 2) == 7 and releasable("ab\ufffd", 0) == 2


def test_characters_split_over_several_tokens_in_a_row_all_come_out_whole(tokenizer):
    text = "你好世界! 😶‍🌫️ ok"
    ids = [b for b in tokenizer.encode_text(text)]
    out = TextOutput(tokenizer, stop=[])
    streamed = "".join(out.add(i) for i in ids) + out.flush()
    assert streamed == out.text == text


def test_stop_strings_end_the_content_and_never_cut_a_tool_calls_arguments(tokenizer):
    """Settled: a stop string ends the reply's text; inside tool calls (their name and JSON arguments) it is
    data, so a call is never cut into invalid JSON."""
    from nanoseek.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP

    call = f'{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}f\n```json\n{{"a": "}}"}}\n```{TOOL_CALL_END}'
    out = TextOutput(tokenizer, stop=["}"])
    for i in tokenizer.encode("Let me call it." + call + TOOL_CALLS_END):
        out.add(i)
    assert not out.stopped and out.text.endswith('{"a": "}"}\n```')
    before = TextOutput(tokenizer, stop=["}"])
    for i in tokenizer.encode("a } b" + call):
        before.add(i)
        if before.stopped:
            break
    assert before.stopped and before.text == "a "
