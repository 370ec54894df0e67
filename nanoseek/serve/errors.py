"""HTTP plumbing for the API: errors in OpenAI's envelope (named by what went wrong), and request bodies bounded
before they are read."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    # Of a union's branches, the one whose type fitted and whose constraint failed says the most.
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    # Field names and list indices; pydantic's union branch tags ("function-after[...]") say nothing to a client.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and (isinstance(p, int) or str(p).isidentifier())]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return unrecognized_argument(param)
    if first.get("type") == "unsupported_parameter":
        return ApiError(400, str(first.get("msg")), param=param, code="unsupported_parameter")
    where = f"{param}: " if param else ""
    return ApiError(400, f"{where}{first.get('msg')}", param=param, code="invalid_value")


# --- the errors by what went wrong: the routes and the service raise these --------------------------------
def unrecognized_argument(param: str | None) -> ApiError:
    message = (
        f"unrecognized request argument supplied: {param} (nanoseek serves the fields of "
        "OpenAI's and DeepSeek's API; the README lists them)"
    )
    return ApiError(400, message, param=param, code="unrecognized_argument")


# who asks
def invalid_api_key() -> ApiError:
    message = "invalid or missing API key: send 'Authorization: Bearer KEY'"
    return ApiError(401, message, type="authentication_error", code="invalid_api_key")


def admin_only() -> ApiError:
    """/metrics under --api-keys on a server started without --admin-key."""
    message = "/metrics shows every key's traffic: start the server with --admin-key KEY and send it as a bearer token"
    return ApiError(403, message, type="permission_error", code="admin_only")


def invalid_admin_key() -> ApiError:
    message = "/metrics needs the admin key: send 'Authorization: Bearer ADMIN_KEY'"
    return ApiError(401, message, type="authentication_error", code="invalid_api_key")


# admission
def model_not_found(model: str, names: list[str]) -> ApiError:
    message = f"the model {model!r} does not exist; this server has {names}"
    return ApiError(404, message, type="not_found_error", param="model", code="model_not_found")


def too_many_generations(n: int, limit: int) -> ApiError:
    """More generations in one request (n x prompts) than the server runs at once: it could never be admitted."""
    message = (
        f"this request asks for {n} generations (n x prompts); this server runs at "
        f"most {limit} at once (--max-pending): split it"
    )
    return ApiError(400, message, param="n", code="too_many_generations")


def server_busy(limit: int) -> ApiError:
    message = f"the server is at its limit of {limit} requests in flight; retry shortly"
    return ApiError(429, message, type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})


def key_concurrency_limit(limit: int) -> ApiError:
    message = (
        f"this API key has {limit} requests in flight, its limit (--max-concurrent-per-key): retry when one finishes"
    )
    return ApiError(429, message, type="rate_limit_error", code="concurrency_limit", headers={"Retry-After": "1"})


def ledger_unavailable(reason: str) -> ApiError:
    """reason: Ledger.unavailable's plain words (the ledger's path and SQLite's text stay in the log)."""
    message = f"{reason}: no billed request is admitted until it can be; retry later"
    return ApiError(503, message, type="server_error", code="ledger_unavailable", headers={"Retry-After": "5"})


def internal_server_error(error_id: str) -> ApiError:
    """A bug: the client is told an id, under which the server's log has the exception (whose text can hold
    source paths, hosts and ports)."""
    message = f"internal server error: the server's log has the details (error id {error_id})"
    return ApiError(500, message, type="server_error", code="internal_error")


def engine_unavailable(reason: str) -> ApiError:
    message = f"{reason}: this server cannot generate; retry on another"
    return ApiError(503, message, type="server_error", code="engine_unavailable")


def too_many_scored(entries: int, limit: int) -> ApiError:
    message = (
        f"this request asks for {entries} log-probabilities (scored tokens x n x (1 + logprobs)); a request may ask "
        f"for at most {limit}: send fewer prompts per request, or a smaller logprobs"
    )
    return ApiError(400, message, param="logprobs", code="too_many_logprobs")


# the context
def text_exceeds_context(size: int, context: int, longest: int, param: str) -> ApiError:
    """Text refused before tokenising: `size` bytes hold more than `context` tokens of at most `longest` bytes."""
    message = (
        f"This model's maximum context length is {context} tokens, and {size} bytes of text hold more than that "
        f"(a token spans at most {longest} bytes): shorten the prompt"
    )
    return ApiError(400, message, param=param, code="context_length_exceeded")


def context_exceeded(prompt_tokens: int, wanted: int, context: int, param: str) -> ApiError:
    message = (
        f"This model's maximum context length is {context} tokens; the prompt has "
        f"{prompt_tokens} tokens and max_tokens asks for {wanted} more ({prompt_tokens + wanted} "
        "in all). Shorten the prompt or lower max_tokens."
    )
    return ApiError(400, message, param=param, code="context_length_exceeded")


# what the request asks for
def no_tool_tokens() -> ApiError:
    message = (
        "this model's tokenizer has no tool-call tokens (train a tokenizer with nanoseek "
        "to get them): it cannot call tools"
    )
    return ApiError(400, message, param="tools")


def constrained_twice() -> ApiError:
    """response_format and constrained tool calls in one request: one grammar holds the reply."""
    message = "response_format and tool calls both constrain the reply: send one (or tool_choice none)"
    return ApiError(400, message, param="response_format")


def prefix_with_grammar() -> ApiError:
    message = (
        "a prefix message with response_format or constrained tool calls: the grammar would "
        "start after text it does not see; send one of them"
    )
    return ApiError(400, message, param="messages")


def misplaced_prefix() -> ApiError:
    message = "prefix: true goes on the last message, an assistant's, whose text the reply continues"
    return ApiError(400, message, param="messages")


def nothing_to_generate() -> ApiError:
    """max_tokens 0 without echo and logprobs (which score the prompt)."""
    message = "max_tokens 0 generates nothing: it takes echo with logprobs, to score the prompt"
    return ApiError(400, message, param="max_tokens")


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets a 413 before it is read (by its Content-Length, or, when
    sent in chunks, as soon as the chunks pass the limit), so no request can hold the server's memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._refuse(scope, send, 400, "the Content-Length header is not a number")
            if int(length) > self.max_bytes:
                return await self._refuse(scope, send, 413, self._too_large())
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True  # chunked: read up to the limit here, then replay
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(scope, send, 413, self._too_large())
        body: bytes | None = b"".join(chunks)

        async def replay():  # the body once, then the connection's own messages (its disconnect above all)
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        return await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes (--max-body-bytes)"

    @staticmethod
    async def _refuse(scope, send, status: int, message: str) -> None:
        code = "request_too_large" if status == 413 else "invalid_request"

        async def nothing():  # the body stays unread
            return {"type": "http.disconnect"}

        await ApiError(status, message, code=code).response()(scope, nothing, send)
