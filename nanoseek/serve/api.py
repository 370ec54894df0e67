"""The HTTP server: an OpenAI- and DeepSeek-compatible API with context caching on disk and billing.

    nanoseek serve --model runs/tiny/model --cache-dir ~/.cache/nanoseek/kv [--api-keys keys.txt]

Routes: POST /v1/chat/completions (also /chat/completions), POST /v1/completions (also /completions;
`suffix` for fill-in-the-middle), GET /v1/models, GET /v1/billing and DeepSeek's GET /user/balance,
GET /health, GET /metrics (Prometheus), and the chat page at /.

Choices, documented for clients:
- Every invalid request is a 400 in OpenAI's error envelope (malformed JSON, a missing field, a value
  out of range: `param` names the field); 401 bad key, 402 balance spent, 404 unknown model or route,
  429 with Retry-After when the server already holds --max-pending requests. No input yields a 500.
- response_format {"type": "json_object"} is refused with a 400: nanoseek does not constrain decoding,
  and a reply that only claims to be JSON would be worse than a clear refusal.
- Prompt prefixes are cached in 64-token units (DeepSeek's), per API key: a prompt of P tokens hits at
  most 64 * floor(P / 64) of them (its last token is computed again even then, for its logits).
- Money: admission reserves a request's worst case against the key's balance (402 when the balance less
  open reservations cannot cover it), usage is written to the SQLite ledger as it is delivered, and a
  ledger that cannot be written turns billed requests away with a 503 until it can (billing.py).
- Strangers: bodies over --max-body-bytes get a 413 before they are read; tokenising, templating and the
  ledger run off the event loop; special-token strings typed into messages or text prompts are text
  (only the chat template opens a turn); with --api-keys, /metrics needs --admin-key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.config import flag
from nanoseek.serve.async_engine import AsyncEngine, EngineError
from nanoseek.serve.billing import (
    InsufficientBalance,
    Ledger,
    LedgerUnavailable,
    Meter,
    PriceTable,
    default_ledger_path,
    read_api_keys,
)
from nanoseek.serve.engine import Engine, RequestOutput
from nanoseek.serve.metrics import ServerMetrics
from nanoseek.serve.output import releasable
from nanoseek.serve.protocol import (
    MAX_SEED,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    chat_logprobs,
    completion_logprobs,
    usage,
)
from nanoseek.serve.sampling import SamplingParams
from nanoseek.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE

CACHE_UNIT = 64  # tokens per cached prefix block, as DeepSeek's context caching
DEFAULT_MAX_TOKENS = 4096
ANONYMOUS = "anonymous"


@dataclass(slots=True)
class ServeConfig:
    model: str | None = flag("a model folder with its tokenizer (required)", default=None)
    host: str = flag("address to listen on", default="127.0.0.1")
    port: int = flag("port to listen on", default=8000)
    served_model_name: str = flag("model names clients send, comma-separated", default="nanoseek")
    api_keys: str | None = flag("file of 'KEY [BALANCE]' lines; none: no auth", default=None)
    cache_dir: str | None = flag("folder for the on-disk context cache", default=None)
    disk_cache_gb: float = flag("bound on the disk cache, LRU-evicted", default=8.0)
    cache_memory_mb: int = flag("memory for the latent KV cache", default=256)
    prices: str = flag("per million tokens: cache-hit,cache-miss,output", default="0.5,2,8")
    currency: str = flag("currency of the prices", default="CNY")
    ledger: str | None = flag(
        "SQLite billing ledger, shareable by servers (default: KEYS.ledger.db beside "
        "--api-keys, else ~/.local/share/nanoseek/ledger.db)",
        default=None,
    )
    admin_key: str | None = flag("bearer key for /metrics (required for it when --api-keys is set)", default=None)
    max_body_bytes: int = flag("larger request bodies get a 413 unread", default=4 * 2**20)
    max_pending: int = flag("requests in flight before 429", default=256)
    max_batched_tokens: int = flag("tokens per engine step", default=512)
    max_seqs: int = flag("sequences per engine step", default=64)
    speculative_tokens: int = flag("MTP draft tokens per step (0: off)", default=0)
    fp8_cache: bool = flag("keep the latent KV cache in FP8", default=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("nanoseek serve needs --model DIR (a folder with config.json and tokenizer.json)")
        if min(self.max_pending, self.max_body_bytes) < 1 or self.disk_cache_gb <= 0 or self.cache_memory_mb <= 0:
            raise ValueError("--max-pending, --max-body-bytes, --disk-cache-gb and --cache-memory-mb must be positive")

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in self.served_model_name.split(",") if n.strip()]


class ApiError(Exception):
    """An error in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    # Of a union's branches, the one whose type fitted and whose constraint failed says the most.
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    # Field names and list indices; pydantic's union branch tags ("function-after[...]") say nothing to a client.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and (isinstance(p, int) or str(p).isidentifier())]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = ".".join(loc) or None
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


class TextDeltas:
    """What of a choice's reasoning and content may be sent now: text that a stop string may still cut,
    or a half-decoded character, waits."""

    def __init__(self, stop: list[str]):
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = {"reasoning_content": 0, "content": 0}

    def advance(self, parts: dict[str, str], finished: bool) -> dict[str, str]:
        out = {}
        for name, text in parts.items():
            ready = len(text) if finished or (name == "reasoning_content" and parts["content"]) else None
            end = releasable(text, self.hold) if ready is None else ready
            if end > self.sent[name]:
                out[name] = text[self.sent[name] : end]
                self.sent[name] = end
        return out


class Generation:
    """The n choices of one prompt in the engine: submitted at once (so admission counts them), read as
    (choice, output so far) pairs, cancelled if the reader goes away before they finish."""

    def __init__(self, runner: AsyncEngine, metrics: ServerMetrics, prompt: list[int], params: list[SamplingParams],
                 salt: str | None, meter: Meter):  # fmt: skip
        self.runner, self.metrics, self.prompt, self.meter = runner, metrics, prompt, meter
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids = [runner.submit(prompt, p, salt, self.queue) for p in params]
        self.live = set(self.ids)
        self.latest: list[RequestOutput] = [RequestOutput(i, prompt, [], "", None) for i in self.ids]
        self.start, self.failed = time.perf_counter(), False
        self._last = [self.start] * len(self.ids)

    @property
    def cached(self) -> int:  # the prompt is billed once: by its first choice's cache hits
        return self.latest[0].cached_tokens

    @property
    def completion(self) -> int:
        return sum(out.completion_tokens for out in self.latest)

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        index = {r: i for i, r in enumerate(self.ids)}
        while self.live:
            item = await self.queue.get()
            if isinstance(item, EngineError):
                self.live.discard(item.request_id)
                self.failed = True
                raise ApiError(500, item.message, type="server_error")
            i, now = index[item.request_id], time.perf_counter()
            previous = self.latest[i]
            if previous.token_ids:
                new = max(1, len(item.token_ids) - len(previous.token_ids))
                for _ in range(new):
                    self.metrics.itl.observe((now - self._last[i]) / new)
            else:
                self.metrics.ttft.observe(now - self.start)
            self._last[i] = now
            self.latest[i] = item
            if item.finish_reason is not None:
                self.live.discard(item.request_id)
                self.metrics.e2e.observe(now - self.start)
            yield i, item

    def cancel(self) -> None:
        for request_id in self.live:
            self.runner.cancel(request_id)
        self.live.clear()

    def deliver(self) -> None:
        """Bill what the client has now: the prompt once, every choice's tokens so far."""
        self.meter.deliver(self.cached, len(self.prompt) - self.cached, self.completion)

    def close(self, streamed: bool = False) -> None:
        """Stop generating and settle the bill. A stream pays for what it was sent; a plain request for what
        was made, also when its client left early (the tokens were computed for it); a request the server
        failed, only for what it had streamed."""
        self.cancel()
        if not (self.failed or streamed):
            self.deliver()
        self.meter.close()


def create_app(cfg: ServeConfig, engine: Engine | None = None) -> FastAPI:
    engine = engine or Engine(
        cfg.model, block_size=CACHE_UNIT, cache_bytes=cfg.cache_memory_mb * 2**20,
        max_batched_tokens=cfg.max_batched_tokens, max_seqs=cfg.max_seqs, fp8_cache=cfg.fp8_cache,
        speculative_tokens=cfg.speculative_tokens, cache_dir=cfg.cache_dir,
        disk_cache_bytes=int(cfg.disk_cache_gb * 2**30),
    )  # fmt: skip
    if engine.tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer.json: the server needs the model's tokenizer")
    tokenizer, context = engine.tokenizer, engine.model.cfg.max_position_embeddings
    keys = read_api_keys(cfg.api_keys) if cfg.api_keys else None
    ledger = open_ledger(cfg)
    ledger.grant(keys or {ANONYMOUS: None})
    runner = AsyncEngine(engine)
    metrics = ServerMetrics(engine)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        runner.shutdown()  # finishes the disk cache's writes
        ledger.close()  # and the ledger's

    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan,
                  description="OpenAI/DeepSeek-compatible API with context caching on disk")  # fmt: skip
    app.state.engine, app.state.runner, app.state.ledger = engine, runner, ledger
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return ApiError(500, f"internal server error: {exc}", type="server_error").response()

    # --- auth, models, admission -----------------------------------------------------------------
    def account(request: Request) -> str:
        if keys is None:
            return ANONYMOUS
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in keys:
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")  # fmt: skip
        return token.strip()

    def admit(body: SamplingRequest, key: str, requests: int) -> None:
        """The checks that need no tokens and no database: model, size, the ledger's health, load."""
        if body.model not in cfg.names:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {cfg.names}",
                           type="not_found_error", param="model", code="model_not_found")  # fmt: skip
        if requests > cfg.max_pending:
            raise ApiError(400, f"this request asks for {requests} generations (n x prompts); this server runs at "
                           f"most {cfg.max_pending} at once (--max-pending): split it", param="n",
                           code="too_many_generations")  # fmt: skip
        if ledger.unavailable is not None:
            raise ApiError(503, f"{ledger.unavailable}: no billed request is admitted until it can be; retry later",
                           type="server_error", code="ledger_unavailable", headers={"Retry-After": "5"})  # fmt: skip
        if runner.pending + requests > cfg.max_pending:
            raise ApiError(429, f"the server is at its limit of {cfg.max_pending} requests in flight; retry shortly",
                           type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})  # fmt: skip

    async def reserve(key: str, prompt_tokens: int, output_tokens: int) -> Meter:
        """Reserve the worst case against the key's balance (in the ledger's transaction, off the loop)."""
        try:
            return await asyncio.to_thread(ledger.open, key, prompt_tokens, output_tokens)
        except InsufficientBalance as e:
            raise ApiError(402, str(e), type="insufficient_balance", code="insufficient_balance") from None
        except LedgerUnavailable as e:
            raise ApiError(
                503,
                f"{e}: no billed request is admitted until it can be; retry later",
                type="server_error",
                code="ledger_unavailable",
                headers={"Retry-After": "5"},
            ) from None

    def sampling_params(body: SamplingRequest, prompt: list[int], max_tokens: int | None,
                        logprobs: int | None, param: str) -> list[SamplingParams]:  # fmt: skip
        wanted = max_tokens if max_tokens is not None else max(1, min(DEFAULT_MAX_TOKENS, context - len(prompt)))
        if len(prompt) + wanted > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                           f"{len(prompt)} tokens and max_tokens asks for {wanted} more ({len(prompt) + wanted} "
                           "in all). Shorten the prompt or lower max_tokens.", param=param,
                           code="context_length_exceeded")  # fmt: skip
        greedy = body.temperature == 0 or body.top_p == 0
        try:
            params = [
                SamplingParams(
                    max_tokens=wanted,
                    temperature=0.0 if greedy else body.temperature,
                    top_p=1.0 if greedy else body.top_p,
                    stop=body.stop_list,
                    seed=None if body.seed is None else (body.seed + i) % MAX_SEED,
                    presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty,
                    logprobs=logprobs,
                )
                for i in range(body.n)
            ]
            engine.check_request(prompt, params[0])
        except ValueError as e:
            raise ApiError(400, str(e), param=param) from None
        return params

    def start(prompt: list[int], params: list[SamplingParams], key: str, meter: Meter) -> Generation:
        return Generation(runner, metrics, prompt, params, None if key == ANONYMOUS else key, meter)

    async def until_disconnected(request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)

    async def collect(request: Request, generation: Generation) -> list[RequestOutput]:
        """The final output of every choice, billed; a client that leaves cancels the generation."""

        async def drain():
            async for _ in generation:
                pass

        work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            generation.close()
        if not work.done() or work.cancelled():
            raise ApiError(499, "the client closed the request", code="client_closed_request")
        work.result()
        return generation.latest

    def check_text_length(texts: list[str], param: str) -> None:
        """Refuse, before tokenising, text that holds more tokens than the context for certain."""
        size, most = sum(len(t.encode()) for t in texts), context * tokenizer.longest_token_bytes
        if size > most:
            raise ApiError(400, f"This model's maximum context length is {context} tokens, and {size} bytes of text "
                           f"hold more than that (a token spans at most {tokenizer.longest_token_bytes} bytes): "
                           "shorten the prompt", param=param, code="context_length_exceeded")  # fmt: skip

    def encode_prompts(prompts: list, suffix: str | None) -> list[list[int]]:
        """Text prompts as plain text (typed special-token strings stay text); token ids as given."""
        if suffix is not None:  # fill-in-the-middle, PSM order, the FIM tokens from the template alone
            hole = [tokenizer.special_id(FIM_HOLE)]
            return [[tokenizer.special_id(FIM_BEGIN), *tokenizer.encode_text(prompts[0]), *hole,
                     *tokenizer.encode_text(suffix), tokenizer.special_id(FIM_END)]]  # fmt: skip
        return [tokenizer.encode_text(p) if isinstance(p, str) else list(p) for p in prompts]

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    # --- routes ----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(resources.files("nanoseek.serve").joinpath("static/index.html").read_text())

    @app.get("/health")
    async def health() -> dict:
        stats = engine.stats()
        return {"status": "ok", "running": stats["running"], "waiting": stats["waiting"], "pending": runner.pending}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        """Every tenant's traffic: open without --api-keys, else for the --admin-key only."""
        if keys is not None:
            if cfg.admin_key is None:
                raise ApiError(403, "/metrics shows every key's traffic: start the server with --admin-key KEY "
                               "and send it as a bearer token", type="permission_error", code="admin_only")  # fmt: skip
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.admin_key.encode()):
                raise ApiError(401, "/metrics needs the admin key: send 'Authorization: Bearer ADMIN_KEY'",
                               type="authentication_error", code="invalid_api_key")  # fmt: skip
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(key: str = Depends(account)) -> dict:
        data = [{"id": name, "object": "model", "created": created, "owned_by": "nanoseek"} for name in cfg.names]
        return {"object": "list", "data": data}

    @app.get("/v1/billing")
    async def billing(key: str = Depends(account)) -> dict:
        """This key's token totals, their cost, its balance, and the price table."""
        return await asyncio.to_thread(ledger.summary, key)

    @app.get("/user/balance")
    async def balance(key: str = Depends(account)) -> dict:
        """DeepSeek's balance shape; available while the balance, less open requests, pays for a minimal one."""
        account = await asyncio.to_thread(ledger.account, key, True)
        left = account.balance(ledger.prices)
        amount = f"{left:.2f}" if left is not None else "inf"
        info = {"currency": ledger.prices.currency, "total_balance": amount, "granted_balance": amount,
                "topped_up_balance": "0.00"}  # fmt: skip
        return {"is_available": account.can_afford(ledger.prices, ledger.minimal_cost()), "balance_infos": [info]}

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, key: str = Depends(account)):
        admit(body, key, body.n)
        if body.response_format is not None and body.response_format.type == "json_object":
            raise ApiError(400, "response_format json_object is not supported: nanoseek does not constrain "
                           "decoding to JSON; ask for JSON in the prompt instead", param="response_format",
                           code="unsupported_parameter")  # fmt: skip
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        check_text_length([m["content"] for m in messages], "messages")
        prompt = await asyncio.to_thread(tokenizer.apply_chat_template, messages, tokenize=True)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, prompt, body.max_completion_tokens or body.max_tokens, top, "messages")
        meter = await reserve(key, len(prompt), sum(p.max_tokens for p in params))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                "system_fingerprint": engine.fingerprint.hex()[:16]}  # fmt: skip

        def parts(out: RequestOutput) -> tuple[dict[str, str], int]:
            return {"reasoning_content": out.reasoning_content, "content": out.content}, out.reasoning_tokens

        def logprobs_of(out: RequestOutput, new: slice = slice(None)) -> dict | None:
            return None if top is None else chat_logprobs(tokenizer, out.token_ids[new], out.logprobs[new], top)

        generation = start(prompt, params, key, meter)
        if not body.stream:
            choices, reasoning_total = [], 0
            for i, out in enumerate(await collect(request, generation)):
                text, reasoning_tokens = parts(out)
                reasoning_total += reasoning_tokens
                message = {"role": "assistant", "content": text["content"]}
                if reasoning_tokens:
                    message["reasoning_content"] = text["reasoning_content"]
                choices.append({"index": i, "message": message, "logprobs": logprobs_of(out),
                                "finish_reason": out.finish_reason})  # fmt: skip
            used = usage(len(prompt), generation.cached, generation.completion, reasoning_total)
            return head | {"object": "chat.completion", "choices": choices, "usage": used}

        async def events() -> AsyncIterator[str]:
            base = head | {"object": "chat.completion.chunk"} | ({"usage": None} if body.include_usage else {})

            def chunk(i: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> str:
                choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                return sse(base | {"choices": [choice]})

            deltas = [TextDeltas(body.stop_list) for _ in range(body.n)]
            sent_logprobs = [0] * body.n
            try:
                for i in range(body.n):
                    yield chunk(i, {"role": "assistant", "content": ""})
                async for i, out in generation:
                    finished = out.finish_reason is not None
                    # Log-probs ride on the next chunk that goes out; held-back text keeps them waiting.
                    logprobs = logprobs_of(out, slice(sent_logprobs[i], None))
                    for name, piece in deltas[i].advance(parts(out)[0], finished).items():
                        yield chunk(i, {name: piece}, logprobs)
                        logprobs, sent_logprobs[i] = None, len(out.logprobs)
                    if finished:
                        yield chunk(i, {}, logprobs, out.finish_reason)
                    generation.deliver()  # billed as it reaches the client
                reasoning = sum(parts(out)[1] for out in generation.latest)
                if body.include_usage:
                    used = usage(len(prompt), generation.cached, generation.completion, reasoning)
                    yield sse(base | {"choices": [], "usage": used})
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
            finally:  # also when the client disconnects: stop generating, bill what it was sent
                generation.close(streamed=True)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(body: CompletionRequest, request: Request, key: str = Depends(account)):
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt else [body.prompt]
        if isinstance(prompts[0], int):
            prompts = [prompts]
        if body.suffix is not None:
            if len(prompts) != 1 or not isinstance(prompts[0], str):
                raise ApiError(400, "suffix (fill-in-the-middle) takes one text prompt", param="suffix")
            if tokenizer.tok.token_to_id(FIM_HOLE) is None:
                raise ApiError(400, "this model's tokenizer has no fill-in-the-middle tokens", param="suffix")
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported (prompt log-probabilities are not kept)",
                           param="echo")  # fmt: skip
        if len(prompts) > 1 and body.stream:
            raise ApiError(400, "stream takes one prompt: send several prompts without stream", param="stream")
        admit(body, key, body.n * len(prompts))
        for p in prompts:
            if isinstance(p, str):
                check_text_length([p, body.suffix or ""], "prompt")
        encoded = await asyncio.to_thread(encode_prompts, prompts, body.suffix)
        jobs = [(ids, sampling_params(body, ids, body.max_tokens, body.logprobs, "prompt")) for ids in encoded]
        meters: list[Meter] = []
        try:
            for ids, params in jobs:
                meters.append(await reserve(key, len(ids), sum(p.max_tokens for p in params)))
        except ApiError:
            for meter in meters:  # release what the earlier prompts reserved
                meter.close()
            raise
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": engine.fingerprint.hex()[:16]}  # fmt: skip

        def echoed(p: int) -> str:
            return "" if not body.echo else prompts[p] if isinstance(prompts[p], str) else tokenizer.decode(encoded[p])

        def logprobs_of(out: RequestOutput, new: slice = slice(None)) -> dict | None:
            return None if body.logprobs is None else completion_logprobs(tokenizer, out.token_ids[new],
                                                                           out.logprobs[new])  # fmt: skip

        if not body.stream:  # every prompt goes to the engine before any is awaited, so they batch
            generations = [start(ids, params, key, meter) for (ids, params), meter in zip(jobs, meters, strict=True)]
            try:
                results = await asyncio.gather(*(collect(request, g) for g in generations))
            finally:
                for g in generations:
                    g.close()
            choices = [{"index": p * body.n + j, "text": echoed(p) + out.text, "logprobs": logprobs_of(out),
                        "finish_reason": out.finish_reason}
                       for p, outs in enumerate(results) for j, out in enumerate(outs)]  # fmt: skip
            totals = [sum(len(ids) for ids, _ in jobs), sum(g.cached for g in generations),
                      sum(g.completion for g in generations)]  # fmt: skip
            return head | {"choices": choices, "usage": usage(*totals)}

        (ids, params), generation = jobs[0], None

        async def events() -> AsyncIterator[str]:
            base = head | ({"usage": None} if body.include_usage else {})

            def chunk(j: int, text: str, logprobs: dict | None = None, finish: str | None = None) -> str:
                return sse(
                    base | {"choices": [{"index": j, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
                )

            deltas = [TextDeltas(body.stop_list) for _ in range(body.n)]
            sent_logprobs = [0] * body.n
            try:
                for j in range(body.n if body.echo else 0):
                    yield chunk(j, echoed(0))
                async for j, out in generation:
                    finished = out.finish_reason is not None
                    piece = deltas[j].advance({"reasoning_content": "", "content": out.text}, finished).get("content")
                    if piece or finished:  # log-probs of held-back tokens go with the next chunk
                        yield chunk(j, piece or "", logprobs_of(out, slice(sent_logprobs[j], None)), out.finish_reason)
                        sent_logprobs[j] = len(out.logprobs)
                    generation.deliver()
                if body.include_usage:
                    yield sse(
                        base | {"choices": [], "usage": usage(len(ids), generation.cached, generation.completion)}
                    )
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
            finally:
                generation.close(streamed=True)

        generation = start(ids, params, key, meters[0])
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def open_ledger(cfg: ServeConfig) -> Ledger:
    """The SQLite ledger at --ledger (or its default); a JSON ledger of older nanoseek is imported once."""
    prices = PriceTable.parse(cfg.prices, cfg.currency)
    path = Path(cfg.ledger) if cfg.ledger else default_ledger_path(cfg.api_keys)
    legacy = [Path(cfg.cache_dir) / "ledger.json"] if cfg.cache_dir else []
    if path.suffix == ".json":  # --ledger named an old JSON ledger: keep the database beside it
        legacy.append(path)
        path = path.with_suffix(".db")
    ledger = Ledger(path, prices)
    for old in legacy:
        if ledger.import_json(old):
            print(f"imported the JSON ledger {old} into {path} (renamed to {old.name}.imported)", flush=True)
    return ledger


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
