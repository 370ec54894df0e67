"""The HTTP server: an OpenAI- and DeepSeek-compatible API with context caching on disk and billing.

    nanoseek serve --model runs/tiny/model --cache-dir ~/.cache/nanoseek/kv [--api-keys keys.txt]

Routes: POST /v1/chat/completions (also /chat/completions), POST /v1/completions (also /completions;
`suffix` for fill-in-the-middle), GET /v1/models, GET /v1/billing and DeepSeek's GET /user/balance,
GET /health, GET /metrics (Prometheus), and the chat page at /. This module assembles the app: the
Service on app.state, the body limit, the error envelope, and the routers of serve/routes/ (one per
endpoint family), which only shape requests and responses; the Service (service.py) admits and bills
(admission.py), builds prompts and sampling parameters (preprocess.py) and runs generations, which
generation.py streams. /openapi.json documents every request and response
(protocol.py's models), stream chunks included.

Choices, documented for clients:
- Every invalid request is a 400 in OpenAI's error envelope (malformed JSON, a missing field, a value
  out of range: `param` names the field); 401 bad key, 402 balance spent, 404 unknown model or route,
  429 with Retry-After when the server already holds --max-pending requests. No input yields a 500.
- response_format json_object / json_schema and tool calls (required, named, or of `strict` functions)
  constrain decoding with a grammar (serve/grammar.py): the reply parses and validates, unless it runs
  out of max_tokens first (finish_reason "length"). A schema feature that cannot be enforced is a 400.
- Prompt prefixes are cached in 64-token units (DeepSeek's), per API key: a prompt of P tokens hits at
  most 64 * floor(P / 64) of them (its last token is computed again even then, for its logits).
- Money: admission reserves a request's worst case against the key's balance (402 when the balance less
  open reservations cannot cover it), usage is written to the SQLite ledger as it is delivered, and a
  ledger that cannot be written turns billed requests away with a 503 until it can (ledger.py).
- Strangers: bodies over --max-body-bytes get a 413 before they are read; tokenising, templating and the
  ledger run off the event loop; special-token strings typed into messages or text prompts are text
  (only the chat template opens a turn); with --api-keys, /metrics needs --admin-key.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.serve.async_engine import log_failure
from nanoseek.serve.engine import Engine
from nanoseek.serve.errors import ApiError, BodyLimit, internal_server_error, validation_error
from nanoseek.serve.routes import ROUTERS
from nanoseek.serve.routes.common import openapi
from nanoseek.serve.service import ServeConfig, Service

__all__ = ["ServeConfig", "create_app", "serve"]


def create_app(cfg: ServeConfig, engine: Engine | None = None) -> FastAPI:
    app = FastAPI(
        title="nanoseek",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI/DeepSeek-compatible API with context caching on disk",
    )
    app.state.service = Service(cfg, engine)  # what the routes' dependencies read (routes/common.py)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = partial(openapi, app)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.service.close()  # the engine thread, the disk cache's writes and the ledger's


# --- every error in OpenAI's envelope ------------------------------------------------------------------
async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc).response()


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return ApiError(exc.status_code, str(exc.detail), type=kind).response()


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    error_id = log_failure(f"{request.method} {request.url.path} failed", trace=exc)
    return internal_server_error(error_id).response()


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio turns Nagle off (TCP_NODELAY) only on sockets that name it, and
    # with Nagle on every reply waits out a 40 ms delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}): pick another --port") from None
    app = create_app(cfg)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    print(f"nanoseek serving {cfg.names} at http://{cfg.host}:{cfg.port} (chat page at /)", flush=True)
    server.run(sockets=[sock])


def run(cfg: ServeConfig) -> int:
    """`nanoseek serve`: until stopped. Under torchrun the ranks > 0 run their engines on rank 0's orders."""
    from nanoseek.serve.config import CACHE_UNIT
    from nanoseek.serve.parallel import run_as_worker

    if (code := run_as_worker(cfg.model, cfg.engine, CACHE_UNIT)) is not None:
        return code
    serve(cfg)
    return 0
