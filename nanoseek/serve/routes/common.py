"""What every route module shares: the service and the caller's key as FastAPI dependencies (read from
app.state, so that a route is a plain function, not a closure over create_app), and the OpenAPI entries
of error statuses and of server-sent event streams."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from nanoseek.serve.protocol import ErrorResponse
from nanoseek.serve.service import Service

REF = "#/components/schemas/{model}"


# Async, so that they run on the event loop (a sync dependency would take a worker thread per request).
async def service(request: Request) -> Service:
    return request.app.state.service


async def api_key(request: Request) -> str:
    """The caller's API key; 401 without a valid one."""
    return request.app.state.service.admission.authenticate(request)


ServiceDep = Annotated[Service, Depends(service)]
ApiKey = Annotated[str, Depends(api_key)]

ERRORS = {
    400: "an invalid request: malformed JSON, a missing field, a value out of range (`param` names it)",
    401: "a missing or invalid API key",
    402: "the key's balance, less its open requests, cannot cover the request's worst case",
    404: "an unknown model",
    413: "a body over --max-body-bytes, refused unread",
    429: "the server holds --max-pending requests, or the key --max-concurrent-per-key (see Retry-After)",
    503: "the ledger takes no writes (see Retry-After), or the engine has failed",
}


GENERATING = (400, 401, 402, 404, 413, 429, 503)  # the error statuses of the chat and completions routes


def error_docs(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's error statuses for `responses=`, each in OpenAI's envelope. "default" (any other status,
    a 500 among them) also keeps FastAPI from documenting a 422 that this API never sends (it sends 400)."""
    documented: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": ERRORS[status]} for status in statuses
    }
    return documented | {"default": {"model": ErrorResponse, "description": "any other error, in the same envelope"}}


_streamed: list[type[BaseModel]] = []  # the chunk models, added to the schema's components by `openapi`


def event_stream(chunk: type[BaseModel], whole: str) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that answers JSON (its response_model) or, with `stream`, server-sent events: each
    event's data a `chunk` as JSON, an error event in OpenAI's envelope if the generation fails, and
    `data: [DONE]` last (FastAPI's own SSE item schema, whose data holds JSON)."""
    _streamed.append(chunk)
    data = {"anyOf": [{"$ref": REF.format(model=chunk.__name__)}, {"$ref": REF.format(model="ErrorResponse")}]}
    item = {
        "type": "object",
        "properties": {"data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data}},
        "required": ["data"],
    }
    description = f"{whole} (application/json); with stream, {chunk.__name__} events, then data: [DONE]"
    return {200: {"description": description, "content": {"text/event-stream": {"itemSchema": item}}}}


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with the chunk models among its components: FastAPI collects the models of
    response_model= and responses=, and the chunks are named in an event stream's item schema only."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # caches it in app.openapi_schema
        _, chunks = models_json_schema([(m, "serialization") for m in _streamed], ref_template=REF)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in chunks.get("$defs", {}).items():
            components.setdefault(name, definition)  # the models both name (Usage, ...) are FastAPI's already
    return app.openapi_schema
