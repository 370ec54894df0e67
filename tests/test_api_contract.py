"""DeepSeek's API contract beyond plain chat, against the app in this process (a real Engine on a tiny
model, reached through httpx's ASGI transport) with the real `openai` client: every field either honoured or
refused with a 400 naming it, thinking on and off (and a reasoning model alias), chat prefix completion and
the beta routes, logit_bias, per-key concurrency limits; and /openapi.json, which documents every response
and stream chunk as they are served."""

import asyncio
import json
import time

import jsonschema
import openai
import pytest
import torch
from fastapi.routing import APIRoute
from serving import InProcess, make_model_dir

from nanoseek.checkpoint import from_pretrained
from nanoseek.serve import protocol
from nanoseek.serve.config import CACHE_UNIT, EngineConfig, ServeConfig
from nanoseek.serve.engine import Engine
from nanoseek.serve.routes import ROUTERS
from nanoseek.tokenizer import ASSISTANT, END_THINK, THINK

pytestmark = pytest.mark.anyio

GREEDY = dict(max_tokens=6, temperature=0)
LIMIT = 2  # --max-concurrent-per-key


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return make_model_dir(tmp_path_factory.mktemp("contract") / "model", tokenizer)


@pytest.fixture(scope="module")
async def server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("contract-server")
    (root / "keys.txt").write_text("key-a\nkey-b\n")
    cfg = ServeConfig(
        model=str(model_dir),
        engine=EngineConfig(enforce_eager=True),
        api_keys=str(root / "keys.txt"),
        reasoning_model_name="deepseek-reasoner",
        max_concurrent_per_key=LIMIT,
    )
    # fp32 whatever the CPU: log-probabilities are compared with a direct fp32 forward pass.
    engine = Engine(model_dir, config=cfg.engine, dtype=torch.float32, block_size=CACHE_UNIT)
    async with InProcess(cfg, engine) as s:
        yield s


def client(server: InProcess, key: str = "key-a", beta: bool = False) -> openai.AsyncOpenAI:
    return server.openai(key, "/beta" if beta else "/v1")


async def ask(c: openai.AsyncOpenAI, messages, model: str = "nanoseek", **kwargs):
    return await c.chat.completions.create(model=model, messages=messages, **(GREEDY | kwargs))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def completion_of(server: InProcess, ids: list[int], max_tokens: int = GREEDY["max_tokens"]) -> tuple[str, int]:
    """The greedy continuation of a token-id prompt through /v1/completions: the text and its prompt size."""
    r = await client(server).completions.create(model="nanoseek", prompt=ids, max_tokens=max_tokens, temperature=0)
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
async def test_a_field_nanoseek_does_not_serve_is_a_400_that_names_it(server, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        await ask(client(server), user("hi"), extra_body={field: value})
    assert e.value.body["param"].split(".")[0] == field, e.value.body
    assert e.value.body["code"] in ("unsupported_parameter", "unrecognized_argument", "invalid_value")


async def test_fields_clients_send_as_defaults_are_accepted(server):
    reply = await ask(
        client(server),
        user("hi"),
        user="someone",
        store=False,
        service_tier="auto",
        modalities=["text"],
        extra_body={"prompt_cache_key": "k", "safety_identifier": "s"},
    )
    assert reply.choices[0].finish_reason == "length"


async def test_a_message_field_nobody_defines_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        await ask(client(server), [{"role": "user", "content": "hi", "mood": "happy"}])
    assert e.value.body["param"] == "messages.0.mood"


async def test_thinking_enabled_opens_think_and_the_reply_is_reasoning(server, tokenizer):
    c = client(server)
    thinking = await ask(c, user("why?"), extra_body={"thinking": {"type": "enabled"}})
    ids = [*tokenizer.apply_chat_template(user("why?"), tokenize=True), tokenizer.special_id(THINK)]
    text, prompt_tokens = await completion_of(server, ids)
    assert thinking.usage.prompt_tokens == prompt_tokens
    message = thinking.choices[0].message
    assert message.content + message.reasoning_content == text  # an untrained model: no </think> in 6 tokens
    assert message.reasoning_content and thinking.usage.completion_tokens_details.reasoning_tokens == 6
    # The reasoning alias thinks by default; its thinking field can turn that off.
    alias = await ask(c, user("why?"), model="deepseek-reasoner")
    assert alias.choices[0].message.reasoning_content == message.reasoning_content


async def test_thinking_disabled_closes_think_and_the_reply_is_content(server, tokenizer):
    c = client(server)
    direct = await ask(c, user("why?"), model="deepseek-reasoner", extra_body={"thinking": {"type": "disabled"}})
    ids = [*tokenizer.apply_chat_template(user("why?"), tokenize=True), tokenizer.special_id(END_THINK)]
    text, prompt_tokens = await completion_of(server, ids)
    assert direct.usage.prompt_tokens == prompt_tokens
    message = direct.choices[0].message
    assert message.content == text and not getattr(message, "reasoning_content", None)
    assert direct.usage.completion_tokens_details.reasoning_tokens == 0


async def test_an_earlier_replys_reasoning_is_not_fed_back(server):
    c = client(server)
    plain = [*user("2+2?"), {"role": "assistant", "content": "4"}, *user("and 3+3?")]
    thought = "two and two make four"
    answer = {"role": "assistant", "content": f"<think>{thought}</think>4", "reasoning_content": thought}
    reasoned = [*user("2+2?"), answer, *user("and 3+3?")]
    a, b = await ask(c, plain), await ask(c, reasoned)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.parametrize("beta", [False, True], ids=["v1", "beta"])
async def test_chat_prefix_completion_continues_the_last_assistant_message(server, tokenizer, beta):
    messages = [*user("write a function"), {"role": "assistant", "content": "def add(a, b):", "prefix": True}]
    reply = await ask(client(server, beta=beta), messages)
    ids = tokenizer.apply_chat_template(user("write a function"), tokenize=True)
    assert ids[-1] == tokenizer.special_id(ASSISTANT)
    text, prompt_tokens = await completion_of(server, ids + tokenizer.encode("def add(a, b):"))
    assert (reply.usage.prompt_tokens, reply.choices[0].message.content) == (prompt_tokens, text)


async def test_prefix_anywhere_but_on_a_last_assistant_message_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        await ask(client(server), [{"role": "user", "content": "hi", "prefix": True}])
    assert e.value.body["param"] == "messages"


async def test_fill_in_the_middle_on_the_beta_route(server):
    c = client(server, beta=True)
    fim = dict(model="nanoseek", prompt="def f(x):\n    return ", suffix="\n", **GREEDY)
    beta, v1 = await c.completions.create(**fim), await client(server).completions.create(**fim)
    assert beta.choices[0].text == v1.choices[0].text


async def test_logit_bias_forces_and_bans_tokens(server, tokenizer):
    c = client(server)
    forced = tokenizer.encode("Z")[0]
    reply = await ask(c, user("hi"), logit_bias={str(forced): 100})
    assert reply.choices[0].message.content == "Z" * 6
    plain = await ask(c, user("hi"), max_tokens=1, logprobs=True)
    first = tokenizer.encode(plain.choices[0].logprobs.content[0].token)[0]
    banned = await ask(c, user("hi"), max_tokens=1, logit_bias={str(first): -100})
    assert banned.choices[0].message.content != plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        await ask(c, user("hi"), logit_bias={"not-a-token": 1})
    assert e.value.body["param"] == "logit_bias"


async def test_best_of_other_than_n_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        await client(server).completions.create(model="nanoseek", prompt="x", best_of=3, **GREEDY)
    assert e.value.body["param"] == "best_of"


async def test_a_key_over_its_concurrency_limit_gets_429_with_retry_after_and_others_do_not(server):
    body = {"model": "nanoseek", "messages": user("count"), "max_tokens": 900, "temperature": 0, "stream": True}
    async with server.client("key-b") as http, server.client() as probe:
        streams = [asyncio.create_task(http.post("/v1/chat/completions", json=body)) for _ in range(LIMIT)]
        while (await probe.get("/health")).json()["pending"] < LIMIT:  # both streams are running
            assert not any(s.done() for s in streams), "a stream ended before the limit was reached"
            await asyncio.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            await ask(client(server, key="key-b"), user("hi"))
        assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "concurrency_limit"
        assert (await ask(client(server, key="key-a"), user("hi"))).choices  # another key is not limited
        for s in streams:
            s.cancel()  # the client leaves (as a dropped connection cancels the app): the slots come back
        await asyncio.gather(*streams, return_exceptions=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            assert (await ask(client(server, key="key-b"), user("hi"))).choices
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the key's slots never came back"
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token-ids"])
async def test_echo_logprobs_score_the_prompt_as_a_direct_forward_pass_also_from_the_cache(
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
        r = await c.completions.create(
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


async def test_max_tokens_0_without_echo_logprobs_and_streamed_scoring_are_400s(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        await c.completions.create(model="nanoseek", prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        await c.completions.create(model="nanoseek", prompt="x", max_tokens=1, echo=True, logprobs=1, stream=True)
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
async def test_required_and_named_tool_choice_give_a_call_that_validates_streamed_or_not(server, choice, names):
    c = client(server)
    one = dict(tools=[ADD, WEATHER], tool_choice=choice, parallel_tool_calls=False, **TOOL_TURN)
    reply = await ask(c, user("what is 2 + 3?"), **one)
    [choice0] = reply.choices
    called = validate_calls(choice0.message.tool_calls)
    assert called and (names is None or called == names) and choice0.finish_reason == "tool_calls"
    assert choice0.message.content == ""
    chunks = [chunk async for chunk in await ask(c, user("what is 2 + 3?"), stream=True, **one)]
    streamed = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, d.function.arguments) for d in streamed] == [
        (i, call.function.name, call.function.arguments) for i, call in enumerate(choice0.message.tool_calls)
    ]
    assert all(d.id.startswith("call_") and d.type == "function" for d in streamed)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_parallel_tool_calls_may_call_several_tools_each_well_formed(server):
    reply = await ask(
        client(server),
        user("2 + 3 and the weather in Lima"),
        tools=[ADD, WEATHER],
        tool_choice="required",
        max_tokens=200,
        temperature=0,
    )
    assert len(validate_calls(reply.choices[0].message.tool_calls)) > 1  # an untrained model calls again and again


async def test_tool_choice_none_never_calls_and_the_tools_are_still_in_the_prompt(server):
    c = client(server)
    with_tools = await ask(c, user("2 + 3?"), tools=[ADD], tool_choice="none", max_tokens=20, temperature=0)
    plain = await ask(c, user("2 + 3?"), max_tokens=20, temperature=0)
    assert not with_tools.choices[0].message.tool_calls and with_tools.choices[0].finish_reason == "length"
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20


async def test_auto_with_a_strict_function_calls_it_well_formed_or_answers_in_text(server):
    strict = {"type": "function", "function": {**ADD["function"], "strict": True}}
    reply = await ask(client(server), user("2 + 3?"), tools=[strict], tool_choice="auto", **TOOL_TURN)
    message = reply.choices[0].message
    assert validate_calls(message.tool_calls or []) or message.content


async def test_a_tool_conversation_renders_the_calls_and_their_results(server, tokenizer):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [
        *user("2 + 3?"),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    reply = await ask(client(server), messages, tools=[ADD], max_tokens=4, temperature=0)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, tools=[ADD])
    assert reply.usage.prompt_tokens == len(ids)
    assert tokenizer.decode(ids).endswith(
        'add\n```json\n{"a": 2, "b": 3}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
        "<｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>5"
        "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )


async def test_tool_requests_that_cannot_hold_are_400s(server):
    c = client(server)
    for kwargs, param in [
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[ADD], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tools=[ADD, ADD]), "tools"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools"),
        (dict(tools=[ADD], tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    ]:  # and a prefix to continue under a grammar (which would start after text it does not see):
        with pytest.raises(openai.BadRequestError) as e:
            await ask(c, user("hi"), **kwargs)
        assert e.value.body["param"].split(".")[0] == param, (kwargs, e.value.body)
    prefix = [*user("hi"), {"role": "assistant", "content": '{"a": ', "prefix": True}]
    with pytest.raises(openai.BadRequestError) as e:
        await ask(c, prefix, response_format={"type": "json_object"})
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


async def test_json_schema_output_from_an_untrained_model_validates_streamed_or_not(server):
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = await ask(c, user("who?"), response_format=fmt, max_tokens=200, temperature=0)
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    assert reply.choices[0].finish_reason == "stop"
    stream = await ask(c, user("who?"), response_format=fmt, max_tokens=200, temperature=0, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == reply.choices[0].message.content
    sampled = await ask(c, user("who?"), response_format=fmt, max_tokens=200, temperature=1.0, seed=3, n=3)
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


async def test_json_object_output_parses_and_a_reasoning_reply_is_constrained_after_its_think(server, tokenizer):
    c = client(server)
    reply = await ask(c, user("json please"), response_format={"type": "json_object"}, max_tokens=300, temperature=0)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    end_think = str(tokenizer.special_id(END_THINK))
    thought = await ask(
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
async def test_a_schema_feature_that_cannot_be_enforced_is_a_400_naming_it(server, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as e:
        await ask(client(server), user("hi"), response_format=fmt)
    assert e.value.body["param"] == "response_format" and e.value.body["code"] == "unsupported_schema"
    assert ("if" in e.value.message and "else" in e.value.message) or "look-around" in e.value.message


async def test_vllm_tokenizer_routes_tokenise_with_the_servers_tokenizer(server, tokenizer):
    text = "def f(x):\n    return x<｜end▁of▁sentence｜>"
    async with server.client("key-a") as http:
        r = await http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
        assert r.json()["tokens"] == tokenizer.encode(text) and r.json()["count"] == len(tokenizer.encode(text))
        assert r.json()["tokens"][-1] == tokenizer.eos_id  # special-token strings are the special tokens, as vLLM's
        with_bos = (await http.post("/tokenize", json={"prompt": text})).json()["tokens"]
        assert with_bos == [tokenizer.bos_id, *tokenizer.encode(text)]
        chat = (await http.post("/tokenize", json={"messages": user("hi")})).json()
        assert chat["tokens"] == tokenizer.apply_chat_template(user("hi"), tokenize=True)
        back = (await http.post("/detokenize", json={"tokens": r.json()["tokens"]})).json()
        assert back == {"prompt": text}
        info = (await http.get("/tokenizer_info")).json()
        assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
        for path, body in [("/detokenize", {"tokens": [10**9]}), ("/tokenize", {}), ("/tokenize", {"prompt": 5})]:
            r = await http.post(path, json=body)
            assert r.status_code == 400 and "error" in r.json(), (path, r.text)
        r = await http.post("/tokenize", json={"messages": user("hi"), "continue_final_message": True})
        assert r.status_code == 400 and "assistant" in r.json()["error"]["message"]
    async with server.client() as anonymous:
        assert (await anonymous.post("/tokenize", json={"prompt": "x"})).status_code == 401


# --- /openapi.json: every response documented, as it is served ----------------------------------------------
STREAMS = {"/chat/completions": "ChatCompletionChunk", "/completions": "CompletionChunk"}


async def openapi_spec(server: InProcess) -> dict:
    async with server.client() as http:
        return (await http.get("/openapi.json")).json()


def refs(node) -> list[str]:
    """Every $ref in a JSON document."""
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for value in node.values() for r in refs(value)]
    return [r for value in node for r in refs(value)] if isinstance(node, list) else []


async def test_openapi_lists_a_response_schema_for_every_route_and_the_stream_chunks(server):
    spec = await openapi_spec(server)
    schemas = spec["components"]["schemas"]
    routes = [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]
    listed = {(route.path, method.lower()) for route in routes if route.include_in_schema for method in route.methods}
    assert {(path, method) for path, ops in spec["paths"].items() for method in ops} == listed
    assert {route.path for route in routes if not route.include_in_schema} == {"/", "/metrics"}  # not API
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            assert "422" not in responses, path  # invalid requests are 400s, in the error envelope
            for status, response in responses.items():
                ref = response["content"]["application/json"]["schema"]["$ref"]
                name = ref.rsplit("/", 1)[-1]
                assert schemas[name]["properties"], (path, method, status)
                error = "HealthUnavailable" if path == "/health" else "ErrorResponse"
                assert status == "200" or name == error, (path, method, status)
            stream = responses["200"]["content"].get("text/event-stream")
            chunk = next((name for suffix, name in STREAMS.items() if path.endswith(suffix)), None)
            assert (stream is None) == (chunk is None), path
            if chunk is not None:
                data = stream["itemSchema"]["properties"]["data"]
                assert data["contentMediaType"] == "application/json"
                assert {r.rsplit("/", 1)[-1] for r in refs(data["contentSchema"])} == {chunk, "ErrorResponse"}
    assert {"ChatCompletionChunk", "ChatDelta", "ToolCallDelta", "CompletionChunk"} <= schemas.keys()
    assert all(r.removeprefix("#/components/schemas/") in schemas for r in refs(spec)), "a $ref that resolves nowhere"


def documented(spec: dict, name: str, data: dict) -> None:
    """`data` is what /openapi.json says `name` is (the published schema), and has no field it leaves out."""
    jsonschema.validate(data, {"$ref": f"#/components/schemas/{name}", "components": spec["components"]})
    model = getattr(protocol, name)
    assert model.model_validate(data).model_dump(mode="json", exclude_unset=True) == data, name


def events(body: str) -> list[dict]:
    data = [event.removeprefix("data: ") for event in body.split("\n\n") if event]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


CHAT = {"model": "nanoseek", "messages": user("hi"), "max_tokens": 5, "temperature": 0}
CALLS = {"tools": [ADD], "tool_choice": "required", "max_tokens": 60}
USAGE = {"stream_options": {"include_usage": True}}
PROMPT = {"model": "nanoseek", "prompt": "def f", "max_tokens": 4, "temperature": 0}


# Each route's replies, whole and streamed, with each optional part: logprobs, reasoning, tool calls, usage.
REPLIES = {
    "chat-n-logprobs": ("/v1/chat/completions", CHAT | {"n": 2, "logprobs": True, "top_logprobs": 2}, "ChatCompletion"),
    "chat-reasoning": ("/v1/chat/completions", CHAT | {"model": "deepseek-reasoner"}, "ChatCompletion"),
    "chat-tool-calls": ("/v1/chat/completions", CHAT | CALLS, "ChatCompletion"),
    "chat-stream-usage-logprobs": (
        "/v1/chat/completions",
        CHAT | USAGE | {"stream": True, "logprobs": True},
        "ChatCompletionChunk",
    ),
    "chat-stream-reasoning": (
        "/v1/chat/completions",
        CHAT | {"model": "deepseek-reasoner", "stream": True},
        "ChatCompletionChunk",
    ),
    "chat-stream-tool-calls": ("/v1/chat/completions", CHAT | CALLS | {"stream": True}, "ChatCompletionChunk"),
    "completion-prompts-n": ("/v1/completions", PROMPT | {"prompt": ["a", "b"], "n": 2}, "Completion"),
    "completion-echo-logprobs": ("/v1/completions", PROMPT | {"echo": True, "logprobs": 2}, "Completion"),
    "completion-stream-usage-logprobs": (
        "/v1/completions",
        PROMPT | USAGE | {"stream": True, "logprobs": 1, "n": 2},
        "CompletionChunk",
    ),
    "completion-stream-echo": ("/v1/completions", PROMPT | {"stream": True, "echo": True}, "CompletionChunk"),
    "error": ("/v1/chat/completions", CHAT | {"model": "nope"}, "ErrorResponse"),
    "tokenize-strs": ("/tokenize", {"prompt": "x", "return_token_strs": True}, "TokenizeResponse"),
    "tokenize": ("/tokenize", {"prompt": "x"}, "TokenizeResponse"),
    "detokenize": ("/detokenize", {"tokens": [5, 6]}, "DetokenizeResponse"),
    "tokenizer-info": ("/tokenizer_info", None, "TokenizerInfo"),
    "models": ("/v1/models", None, "ModelList"),
    "billing": ("/v1/billing", None, "BillingSummary"),
    "balance": ("/user/balance", None, "UserBalance"),
    "health": ("/health", None, "Health"),
}


@pytest.mark.parametrize(("path", "body", "name"), REPLIES.values(), ids=REPLIES.keys())
async def test_every_reply_and_stream_chunk_is_what_openapi_documents(server, path, body, name):
    spec = await openapi_spec(server)
    async with server.client("key-a") as http:
        r = await (http.get(path) if body is None else http.post(path, json=body))
    if r.headers["content-type"].startswith("text/event-stream"):
        chunks = events(r.text)
        assert len(chunks) > 2
        for chunk in chunks:
            documented(spec, "ErrorResponse" if "error" in chunk else name, chunk)
    else:
        documented(spec, name, r.json())
