"""HTTP plumbing for the API: errors in OpenAI's envelope, and request bodies bounded before they are read."""

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
        return ApiError(
            400,
            f"unrecognized request argument supplied: {param} (nanoseek serves the fields of "
            "OpenAI's and DeepSeek's API; the README lists them)",
            param=param,
            code="unrecognized_argument",
        )
    if first.get("type") == "unsupported_parameter":
        return ApiError(400, str(first.get("msg")), param=param, code="unsupported_parameter")
    where = f"{param}: " if param else ""
    return ApiError(400, f"{where}{first.get('msg')}", param=param, code="invalid_value")


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
        body = b"".join(chunks)

        async def replay():
            nonlocal body
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
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
