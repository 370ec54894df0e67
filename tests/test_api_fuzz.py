"""Schemathesis over the served OpenAPI spec: whatever a client sends, the server never answers 5xx."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from serving import Server, make_model_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("fuzz")
    with Server(make_model_dir(root / "model", tokenizer), "--cache-dir", str(root / "kv")) as s:
        yield s


def aim_at_the_engine(case) -> None:
    """Half the generated requests name the served model, so they reach the engine; short replies keep the
    run bounded."""
    if isinstance(case.body, dict) and "model" in case.body:
        if len(str(case.body)) % 2 == 0:
            case.body["model"] = "nanoseek"
        if isinstance(case.body.get("max_tokens"), int) and case.body["max_tokens"] > 8:
            case.body["max_tokens"] = 8
        if isinstance(case.body.get("n"), int) and case.body["n"] > 2:
            case.body["n"] = 2
        case.body.pop("max_completion_tokens", None)


def test_no_request_yields_a_server_error(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    statuses: dict[str, list[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
        )
        def check(case):
            aim_at_the_engine(case)
            response = case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=60)
            statuses.setdefault(case.operation.path, []).append(response.status_code)

        check()
    # Beside the generated cases, one valid request per generating route: the engine must answer it.
    valid = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
        "/v1/completions": {"prompt": "x"},
    }
    for operation in operations:
        if operation.path in valid:
            case = operation.Case(body={"model": "nanoseek", "max_tokens": 4, **valid[operation.path]})
            assert case.call_and_validate(base_url=server.url, checks=[not_a_server_error]).status_code == 200
    assert len(statuses) == len(operations) and sum(map(len, statuses.values())) > 5 * len(operations)
