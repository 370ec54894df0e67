"""DeepSeek's API contract beyond plain chat, against a real `nanoseek serve` with the real `openai` client:
every field either honoured or refused with a 400 naming it, thinking on and off (and a reasoning model
alias), chat prefix completion and the beta routes, logit_bias, per-key concurrency limits."""

import json
import time

import httpx
import jsonschema
import openai
import pytest
import torch
from serving import Server, make_model_dir

from nanoseek.checkpoint import from_pretrained
from nanoseek.tokenizer import ASSISTANT, END_THINK, THINK

GREEDY = dict(max_tokens=6, temperature=0)
LIMIT = 2  # --max-concurrent-per-key


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return make_model_dir(tmp_path_factory.mktemp("contract") / "model", tokenizer)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("contract-server")
    (root / "keys.txt").write_text("key-a\nkey-b\n")
    keys = str(root / "keys.txt")
    args = ["--api-keys", keys, "--reasoning-model-name", "deepseek-reasoner", "--max-concurrent-per-key", str(LIMIT)]
    # fp32 whatever the CPU: log-probabilities are compared with a direct fp32 forward pass.
    with Server(model_dir, *args, log=root / "server.log", env={"NANOSEEK_AUTO_DTYPE": "float32"}) as s:
        yield s


def client(server: Server, key: str = "key-a", beta: bool = False) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + ("/beta" if beta else "/v1"), api_key=key, max_retries=0, timeout=60)


def ask(c: openai.OpenAI, messages, model: str = "nanoseek", **kwargs):
    return c.chat.completions.create(model=model, messages=messages, **(GREEDY | kwargs))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def completion_of(server: Server, ids: list[int], max_tokens: int = GREEDY["max_tokens"]) -> tuple[str, list[int]]:
    """The greedy continuation of a token-id prompt through /v1/completions: the text and its prompt size."""
    r = client(server).completions.create(model="nanoseek", prompt=ids, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text, r.usage.prompt_tokens


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
        ("reasoning_effort", "high"),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("store", True),
        ("metadata", {"a": "b"}),
        ("verbosity", "low"),
        ("no_such_field", 1),
        ("modalities", ["audio"]),
        ("service_tier", "flex"),
    ],
)
def test_a_field_nanoseek_does_not_serve_is_a_400_that_names_it(server, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(server), user("hi"), extra_body={field: value})
    assert e.value.body["param"].split(".")[0] == field, e.value.body
    assert e.value.body["code"] in ("unsupported_parameter", "unrecognized_argument", "invalid_value")


def test_fields_clients_send_as_defaults_are_accepted(server):
    reply = ask(
        client(server),
        user("hi"),
        user="someone",
        store=False,
        service_tier="auto",
        modalities=["text"],
        extra_body={"prompt_cache_key": "k", "safety_identifier": "s"},
    )
    assert reply.choices[0].finish_reason == "length"


def test_a_message_field_nobody_defines_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(server), [{"role": "user", "content": "hi", "mood": "happy"}])
    assert e.value.body["param"] == "messages.0.mood"


def test_thinking_enabled_opens_think_and_the_reply_is_reasoning(server, tokenizer):
    c = client(server)
    thinking = ask(c, user("why?"), extra_body={"thinking": {"type": "enabled"}})
    ids = [*tokenizer.apply_chat_template(user("why?"), tokenize=True), tokenizer.special_id(THINK)]
    text, prompt_tokens = completion_of(server, ids)
    assert thinking.usage.prompt_tokens == prompt_tokens
    message = thinking.choices[0].message
    assert message.content + message.reasoning_content == text  # an untrained model: no </think> in 6 tokens
    assert message.reasoning_content and thinking.usage.completion_tokens_details.reasoning_tokens == 6
    # The reasoning alias thinks by default; its thinking field can turn that off.
    alias = ask(c, user("why?"), model="deepseek-reasoner")
    assert alias.choices[0].message.reasoning_content == message.reasoning_content


def test_thinking_disabled_closes_think_and_the_reply_is_content(server, tokenizer):
    c = client(server)
    direct = ask(c, user("why?"), model="deepseek-reasoner", extra_body={"thinking": {"type": "disabled"}})
    ids = [*tokenizer.apply_chat_template(user("why?"), tokenize=True), tokenizer.special_id(END_THINK)]
    text, prompt_tokens = completion_of(server, ids)
    assert direct.usage.prompt_tokens == prompt_tokens
    message = direct.choices[0].message
    assert message.content == text and not getattr(message, "reasoning_content", None)
    assert direct.usage.completion_tokens_details.reasoning_tokens == 0


def test_an_earlier_replys_reasoning_is_not_fed_back(server):
    c = client(server)
    plain = [*user("2+2?"), {"role": "assistant", "content": "4"}, *user("and 3+3?")]
    thought = "two and two make four"
    answer = {"role": "assistant", "content": f"<think>{thought}</think>4", "reasoning_content": thought}
    reasoned = [*user("2+2?"), answer, *user("and 3+3?")]
    a, b = ask(c, plain), ask(c, reasoned)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.parametrize("beta", [False, True], ids=["v1", "beta"])
def test_chat_prefix_completion_continues_the_last_assistant_message(server, tokenizer, beta):
    messages = [*user("write a function"), {"role": "assistant", "content": "def add(a, b):", "prefix": True}]
    reply = ask(client(server, beta=beta), messages)
    ids = tokenizer.apply_chat_template(user("write a function"), tokenize=True)
    assert ids[-1] == tokenizer.special_id(ASSISTANT)
    text, prompt_tokens = completion_of(server, ids + tokenizer.encode("def add(a, b):"))
    assert (reply.usage.prompt_tokens, reply.choices[0].message.content) == (prompt_tokens, text)


def test_prefix_anywhere_but_on_a_last_assistant_message_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(server), [{"role": "user", "content": "hi", "prefix": True}])
    assert e.value.body["param"] == "messages"


def test_fill_in_the_middle_on_the_beta_route(server):
    c = client(server, beta=True)
    beta = c.completions.create(model="nanoseek", prompt="def f(x):\n    return ", suffix="\n", **GREEDY)
    v1 = client(server).completions.create(model="nanoseek", prompt="def f(x):\n    return ", suffix="\n", **GREEDY)
    assert beta.choices[0].text == v1.choices[0].text


def test_logit_bias_forces_and_bans_tokens(server, tokenizer):
    c = client(server)
    forced = tokenizer.encode("Z")[0]
    reply = ask(c, user("hi"), logit_bias={str(forced): 100})
    assert reply.choices[0].message.content == "Z" * 6
    plain = ask(c, user("hi"), max_tokens=1, logprobs=True)
    first = tokenizer.encode(plain.choices[0].logprobs.content[0].token)[0]
    banned = ask(c, user("hi"), max_tokens=1, logit_bias={str(first): -100})
    assert banned.choices[0].message.content != plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, user("hi"), logit_bias={"not-a-token": 1})
    assert e.value.body["param"] == "logit_bias"


def test_best_of_other_than_n_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model="nanoseek", prompt="x", best_of=3, **GREEDY)
    assert e.value.body["param"] == "best_of"


def test_a_key_over_its_concurrency_limit_gets_429_with_retry_after_and_others_do_not(server):
    body = {"model": "nanoseek", "messages": user("count"), "max_tokens": 900, "temperature": 0, "stream": True}
    headers = {"Authorization": "Bearer key-b"}
    with httpx.Client(timeout=60) as http:
        streams = [
            http.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers) for _ in range(LIMIT)
        ]
        lines = []
        for s in streams:
            lines.append(s.__enter__().iter_lines())
            next(lines[-1])  # the stream is running
        with pytest.raises(openai.RateLimitError) as e:
            ask(client(server, key="key-b"), user("hi"))
        assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "concurrency_limit"
        assert ask(client(server, key="key-a"), user("hi")).choices  # another key is not limited
        for s in streams:
            s.__exit__(None, None, None)  # the client leaves: the server cancels, and the slots come back
    deadline = time.monotonic() + 30
    while True:
        try:
            assert ask(client(server, key="key-b"), user("hi")).choices
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the key's slots never came back"
            time.sleep(0.2)


@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token-ids"])
def test_echo_logprobs_score_the_prompt_as_a_direct_forward_pass_also_from_the_cache(
    server, model_dir, tokenizer, as_ids
):
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 3
    ids = tokenizer.encode_text(text)
    model = from_pretrained(model_dir, dtype=torch.float32, device="cpu").eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].log_softmax(-1)
    want = expected[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    c = client(server)
    for max_tokens in (0, 1, 0):  # the third: the prompt's blocks are cached by now
        r = c.completions.create(
            model="nanoseek",
            prompt=ids if as_ids else text,
            echo=True,
            logprobs=2,
            max_tokens=max_tokens,
            temperature=0,
        )
        lp = r.choices[0].logprobs
        assert r.choices[0].text == text if max_tokens == 0 else r.choices[0].text.startswith(text)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.tokens[: len(ids)] == [tokenizer.decode([t]) for t in ids]
        assert len(lp.token_logprobs) == len(ids) + max_tokens
        assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1 : len(ids)], want, strict=True)) < 1e-4
        best = expected[0].topk(2)
        assert list(lp.top_logprobs[1].values()) == pytest.approx(best.values.tolist(), abs=1e-4)
        assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]


def test_max_tokens_0_without_echo_logprobs_and_streamed_scoring_are_400s(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="nanoseek", prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="nanoseek", prompt="x", max_tokens=1, echo=True, logprobs=1, stream=True)
    assert e.value.body["param"] == "stream"


# --- tool calls and structured output -------------------------------------------------------------------
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "a + b",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Lima"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (ADD, WEATHER)}
TOOL_TURN = dict(max_tokens=120, temperature=0)


def validate_calls(calls) -> list[str]:
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [call.function.name for call in calls]


NAMED = {"type": "function", "function": {"name": "weather"}}


@pytest.mark.parametrize(("choice", "names"), [("required", None), (NAMED, ["weather"])])
def test_required_and_named_tool_choice_give_a_call_that_validates_streamed_or_not(server, choice, names):
    c = client(server)
    one = dict(tools=[ADD, WEATHER], tool_choice=choice, parallel_tool_calls=False, **TOOL_TURN)
    reply = ask(c, user("what is 2 + 3?"), **one)
    [choice0] = reply.choices
    called = validate_calls(choice0.message.tool_calls)
    assert called and (names is None or called == names) and choice0.finish_reason == "tool_calls"
    assert choice0.message.content == ""
    chunks = list(ask(c, user("what is 2 + 3?"), stream=True, **one))
    streamed = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, d.function.arguments) for d in streamed] == [
        (i, call.function.name, call.function.arguments) for i, call in enumerate(choice0.message.tool_calls)
    ]
    assert all(d.id.startswith("call_") and d.type == "function" for d in streamed)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_may_call_several_tools_each_well_formed(server):
    reply = ask(
        client(server),
        user("2 + 3 and the weather in Lima"),
        tools=[ADD, WEATHER],
        tool_choice="required",
        max_tokens=200,
        temperature=0,
    )
    assert len(validate_calls(reply.choices[0].message.tool_calls)) > 1  # an untrained model calls again and again


def test_tool_choice_none_never_calls_and_the_tools_are_still_in_the_prompt(server):
    c = client(server)
    with_tools = ask(c, user("2 + 3?"), tools=[ADD], tool_choice="none", max_tokens=20, temperature=0)
    plain = ask(c, user("2 + 3?"), max_tokens=20, temperature=0)
    assert not with_tools.choices[0].message.tool_calls and with_tools.choices[0].finish_reason == "length"
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_auto_with_a_strict_function_calls_it_well_formed_or_answers_in_text(server):
    strict = {"type": "function", "function": {**ADD["function"], "strict": True}}
    reply = ask(client(server), user("2 + 3?"), tools=[strict], tool_choice="auto", **TOOL_TURN)
    message = reply.choices[0].message
    assert validate_calls(message.tool_calls or []) or message.content


def test_a_tool_conversation_renders_the_calls_and_their_results(server, tokenizer):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [
        *user("2 + 3?"),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    reply = ask(client(server), messages, tools=[ADD], max_tokens=4, temperature=0)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, tools=[ADD])
    assert reply.usage.prompt_tokens == len(ids)
    assert tokenizer.decode(ids).endswith(
        'add\n```json\n{"a": 2, "b": 3}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
        "<｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>5"
        "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )


def test_tool_requests_that_cannot_hold_are_400s(server):
    c = client(server)
    for kwargs, param in [
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[ADD], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tools=[ADD, ADD]), "tools"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools"),
        (dict(tools=[ADD], tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    ]:  # and a prefix to continue under a grammar (which would start after text it does not see):
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, user("hi"), **kwargs)
        assert e.value.body["param"].split(".")[0] == param, (kwargs, e.value.body)
    prefix = [*user("hi"), {"role": "assistant", "content": '{"a": ', "prefix": True}]
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, prefix, response_format={"type": "json_object"})
    assert e.value.body["param"] == "messages"


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_output_from_an_untrained_model_validates_streamed_or_not(server):
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = ask(c, user("who?"), response_format=fmt, max_tokens=200, temperature=0)
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(ask(c, user("who?"), response_format=fmt, max_tokens=200, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == reply.choices[0].message.content
    sampled = ask(c, user("who?"), response_format=fmt, max_tokens=200, temperature=1.0, seed=3, n=3)
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_output_parses_and_a_reasoning_reply_is_constrained_after_its_think(server, tokenizer):
    c = client(server)
    reply = ask(c, user("json please"), response_format={"type": "json_object"}, max_tokens=300, temperature=0)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    end_think = str(tokenizer.special_id(END_THINK))
    thought = ask(
        c,
        user("json please"),
        model="deepseek-reasoner",
        response_format={"type": "json_object"},
        max_tokens=300,
        temperature=0,
        logit_bias={end_think: 30},
    )
    message = thought.choices[0].message
    assert isinstance(json.loads(message.content), dict) and thought.usage.completion_tokens_details.reasoning_tokens


@pytest.mark.parametrize(
    "schema", [{"if": {"type": "string"}, "then": {"maxLength": 2}, "else": {}}, {"type": "string", "pattern": "(?=x)"}]
)
def test_a_schema_feature_that_cannot_be_enforced_is_a_400_naming_it(server, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(server), user("hi"), response_format=fmt)
    assert e.value.body["param"] == "response_format" and e.value.body["code"] == "unsupported_schema"
    assert ("if" in e.value.message and "else" in e.value.message) or "look-around" in e.value.message


def test_vllm_tokenizer_routes_tokenise_with_the_servers_tokenizer(server, tokenizer):
    headers = {"Authorization": "Bearer key-a"}
    text = "def f(x):\n    return x<｜end▁of▁sentence｜>"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, headers=headers)
    assert r.json()["tokens"] == tokenizer.encode(text) and r.json()["count"] == len(tokenizer.encode(text))
    assert r.json()["tokens"][-1] == tokenizer.eos_id  # special-token strings are the special tokens, as vLLM's
    with_bos = httpx.post(server.url + "/tokenize", json={"prompt": text}, headers=headers).json()["tokens"]
    assert with_bos == [tokenizer.bos_id, *tokenizer.encode(text)]
    chat = httpx.post(server.url + "/tokenize", json={"messages": user("hi")}, headers=headers).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(user("hi"), tokenize=True)
    back = httpx.post(server.url + "/detokenize", json={"tokens": r.json()["tokens"]}, headers=headers).json()
    assert back == {"prompt": text}
    info = httpx.get(server.url + "/tokenizer_info", headers=headers).json()
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    for path, body in [("/detokenize", {"tokens": [10**9]}), ("/tokenize", {}), ("/tokenize", {"prompt": 5})]:
        r = httpx.post(server.url + path, json=body, headers=headers)
        assert r.status_code == 400 and "error" in r.json(), (path, r.text)
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 401
    r = httpx.post(
        server.url + "/tokenize", json={"messages": user("hi"), "continue_final_message": True}, headers=headers
    )
    assert r.status_code == 400 and "assistant" in r.json()["error"]["message"]
