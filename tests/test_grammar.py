"""Grammar-constrained decoding (nanoseek.serve.grammar): what a constrained tool call may and may not hold."""

import pytest

from nanoseek.serve.grammar import Grammars, tool_grammar
from nanoseek.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP


def call_ids(tokenizer, arguments: str) -> list[int]:
    text = f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}f\n```json\n{arguments}\n```{TOOL_CALL_END}"
    return tokenizer.encode(text + TOOL_CALLS_END)


@pytest.mark.parametrize("strict", [True, False])
def test_a_strict_function_closes_its_objects_to_keys_it_does_not_declare(tokenizer, strict):
    """OpenAI's strict mode: the arguments hold the declared keys only (every object closed, nested ones
    too); a function that is not strict follows JSON Schema, where undeclared keys are allowed."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "o": {"type": "object", "properties": {}}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema, "strict": strict}}]
    grammars = Grammars(tokenizer, tokenizer.vocab_size)
    grammar = tool_grammar(tokenizer, tools, "required", parallel=False, reasoning=False)
    good, extra, nested = (
        call_ids(tokenizer, '{"a": 1}'),
        call_ids(tokenizer, '{"a": 1, "b": 2}'),
        call_ids(tokenizer, '{"a": 1, "o": {"z": 1}}'),
    )
    assert grammars.matcher(grammar).validate_tokens(good) == len(good)
    for ids in (extra, nested):
        accepted = grammars.matcher(grammar).validate_tokens(ids)
        assert (accepted < len(ids)) if strict else (accepted == len(ids))
