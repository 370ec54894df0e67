"""The HTTP server: an OpenAI- and DeepSeek-compatible API with context caching on disk and billing.

    nanoseek serve --model runs/tiny/model --cache-dir ~/.cache/nanoseek/kv [--api-keys keys.txt]

Routes: POST /v1/chat/completions (also /chat/completions), POST /v1/completions (also /completions;
`suffix` for fill-in-the-middle), GET /v1/models, GET /v1/billing and DeepSeek's GET /user/balance,
GET /health, GET /metrics (Prometheus), and the chat page at /. The routes only shape requests and
responses; service.py authenticates, admits, bills and runs generations, generation.py streams them.

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
  ledger that cannot be written turns billed requests away with a 503 until it can (billing.py).
- Strangers: bodies over --max-body-bytes get a 413 before they are read; tokenising, templating and the
  ledger run off the event loop; special-token strings typed into messages or text prompts are text
  (only the chat template opens a turn); with --api-keys, /metrics needs --admin-key.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.serve import errors
from nanoseek.serve.engine import Engine, RequestOutput
from nanoseek.serve.errors import ApiError, BodyLimit, validation_error
from nanoseek.serve.generation import EventStream, TextDeltas, sse, stream_events
from nanoseek.serve.protocol import (
    MAX_SCORED_ENTRIES,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_logprobs,
    completion_logprobs,
    usage,
)
from nanoseek.serve.service import ServeConfig, Service, Ticket
from nanoseek.serve.tools import ToolCall, parse_tool_calls
from nanoseek.tokenizer import CHAT_TEMPLATE, FIM_HOLE

__all__ = ["ServeConfig", "create_app", "serve"]


def create_app(cfg: ServeConfig, engine: Engine | None = None) -> FastAPI:
    service = Service(cfg, engine)
    engine, tokenizer, ledger = service.engine, service.tokenizer, service.ledger
    account = service.authenticate

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        title="nanoseek",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI/DeepSeek-compatible API with context caching on disk",
    )
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return ApiError(500, f"internal server error: {exc}", type="server_error").response()

    # --- routes ----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(resources.files("nanoseek.serve").joinpath("static/index.html").read_text())

    @app.get("/health", response_model=None)
    async def health() -> dict | JSONResponse:
        reason = service.runner.failed or ledger.unavailable  # a failed engine, or a ledger that takes no writes
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        stats = engine.stats()
        return {
            "status": "ok",
            "running": stats["running"],
            "waiting": stats["waiting"],
            "pending": service.runner.pending,
        }

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        service.authorize_admin(request)
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(key: str = Depends(account)) -> dict:
        data = [
            {"id": name, "object": "model", "created": service.created, "owned_by": "nanoseek"} for name in cfg.names
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/billing")
    async def billing(key: str = Depends(account)) -> dict:
        """This key's token totals, their cost, its balance, and the price table."""
        return await asyncio.to_thread(ledger.summary, key)

    @app.get("/user/balance")
    async def balance(key: str = Depends(account)) -> dict:
        """DeepSeek's balance shape; available while the balance, less open requests, pays for a minimal one."""
        account_now = await asyncio.to_thread(ledger.account, key, True)
        left = account_now.balance()
        amount = f"{left:.2f}" if left is not None else "inf"
        info = {
            "currency": ledger.prices.currency,
            "total_balance": amount,
            "granted_balance": amount,
            "topped_up_balance": "0.00",
        }
        return {"is_available": account_now.can_afford(ledger.minimal_cost()), "balance_infos": [info]}

    # --- vLLM's tokenizer routes: clients tokenise with the server's own tokenizer (lm-eval does) ----------
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, key: str = Depends(account)) -> dict:
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send a prompt or messages (one of them)", param="prompt")
        if body.messages is not None:
            ids = await service.chat_prompt(
                [m.template_dict() for m in body.messages],
                None,
                body.continue_final_message,
                add_generation_prompt=body.add_generation_prompt,
            )
        else:
            service.check_text_length([body.prompt], "prompt")
            ids = await asyncio.to_thread(tokenizer.encode, body.prompt)
            ids = [tokenizer.bos_id, *ids] if body.add_special_tokens else ids
        strs = [tokenizer.tok.id_to_token(i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": service.context, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, key: str = Depends(account)) -> dict:
        if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
            raise ApiError(400, f"token ids must lie in [0, {tokenizer.vocab_size})", param="tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(key: str = Depends(account)) -> dict:
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": service.context,
            "vocab_size": tokenizer.vocab_size,
        }

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    @app.post("/beta/chat/completions")  # DeepSeek's beta route (chat prefix completion is served on both)
    async def chat_completions(body: ChatCompletionRequest, request: Request, key: str = Depends(account)):
        ticket = service.admit(body, body.n, key)
        with ticket.released_on_error():
            return await chat(body, request, key, ticket)

    async def chat(body: ChatCompletionRequest, request: Request, key: str, ticket: Ticket):
        prefix = body.messages[-1].prefix
        if any(m.prefix for m in body.messages[:-1]) or (prefix and body.messages[-1].role != "assistant"):
            raise errors.misplaced_prefix()
        tools = service.check_tools(body)
        thinking = cfg.thinks(body.model, body.thinking and body.thinking.type)
        prompt = await service.chat_prompt(
            [m.template_dict() for m in body.messages], None if prefix else thinking, prefix, tools
        )
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = service.sampling_params(body, prompt, body.max_completion_tokens or body.max_tokens, top, "messages")
        await service.steer(body, prompt, params)
        [meter] = await service.reserve(key, [(prompt, params)])
        generation = service.start(prompt, params, key, meter, ticket)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        head = {
            "id": request_id,
            "created": int(time.time()),
            "model": body.model,
            "system_fingerprint": service.fingerprint,
        }

        def logprobs_of(out: RequestOutput, new: slice = slice(None)) -> dict | None:
            return None if top is None else chat_logprobs(tokenizer, out.token_ids[new], out.logprobs[new], top)

        def usage_now() -> dict:
            reasoning = sum(out.reasoning_tokens for out in generation.latest)
            return usage(len(prompt), generation.cached, generation.completion, reasoning)

        def reply(out: RequestOutput) -> tuple[str, list[ToolCall], str | None]:
            """The content, the complete tool calls so far, and the finish reason ("tool_calls" if any)."""
            if not tools or out.tool_calls_at is None:
                return out.content, [], out.finish_reason
            chars, token = out.tool_calls_at
            calls = parse_tool_calls(tokenizer, out.token_ids[token + 1 :])[: None if body.parallel_tool_calls else 1]
            finish = "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason
            return out.content[:chars], calls, finish

        if not body.stream:
            choices = []
            for i, out in enumerate(await service.collect(request, generation)):
                content, calls, finish = reply(out)
                message = {"role": "assistant", "content": content}
                if out.reasoning_tokens:
                    message["reasoning_content"] = out.reasoning_content
                if calls:
                    message["tool_calls"] = [call.to_openai(j, f"{request_id}/{i}") for j, call in enumerate(calls)]
                choices.append({"index": i, "message": message, "logprobs": logprobs_of(out), "finish_reason": finish})
            return head | {"object": "chat.completion", "choices": choices, "usage": usage_now()}

        base = head | {"object": "chat.completion.chunk"} | ({"usage": None} if body.include_usage else {})
        deltas, sent_logprobs = [TextDeltas(body.stop_list) for _ in range(body.n)], [0] * body.n
        sent_calls = [0] * body.n

        def chunk(i: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> str:
            return sse(
                base | {"choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            )

        def chunks(i: int, out: RequestOutput, finished: bool):
            # Log-probs ride on the next chunk that goes out; held-back text keeps them waiting.
            logprobs = logprobs_of(out, slice(sent_logprobs[i], None))
            content, calls, finish = reply(out)
            parts = {"reasoning_content": out.reasoning_content, "content": content}
            for name, piece in deltas[i].advance(parts, finished or bool(calls)).items():
                yield chunk(i, {name: piece}, logprobs)
                logprobs, sent_logprobs[i] = None, len(out.logprobs)
            if len(calls) > sent_calls[i]:  # each call goes out whole, once its <｜tool▁call▁end｜> came
                new = [
                    call.to_openai(j, f"{request_id}/{i}", with_index=True)
                    for j, call in enumerate(calls)
                    if j >= sent_calls[i]
                ]
                yield chunk(i, {"tool_calls": new}, logprobs)
                logprobs, sent_logprobs[i], sent_calls[i] = None, len(out.logprobs), len(calls)
            if finished:
                yield chunk(i, {}, logprobs, finish)

        opening = [chunk(i, {"role": "assistant", "content": ""}) for i in range(body.n)]
        closing = lambda: [sse(base | {"choices": [], "usage": usage_now()})] if body.include_usage else []  # noqa: E731
        return EventStream(generation, stream_events(generation, opening, chunks, closing))

    @app.post("/v1/completions")
    @app.post("/completions")
    @app.post("/beta/completions")  # DeepSeek's beta route for fill-in-the-middle (suffix)
    async def completions(body: CompletionRequest, request: Request, key: str = Depends(account)):
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt else [body.prompt]
        if isinstance(prompts[0], int):
            prompts = [prompts]
        if body.suffix is not None:
            if len(prompts) != 1 or not isinstance(prompts[0], str):
                raise ApiError(400, "suffix (fill-in-the-middle) takes one text prompt", param="suffix")
            if tokenizer.tok.token_to_id(FIM_HOLE) is None:
                raise ApiError(400, "this model's tokenizer has no fill-in-the-middle tokens", param="suffix")
        if body.max_tokens == 0 and not body.scoring:
            raise errors.nothing_to_generate()
        if body.scoring and body.stream:
            raise ApiError(
                400, "echo with logprobs (scoring the prompt) is answered whole: send it without stream", param="stream"
            )
        if len(prompts) > 1 and body.stream:
            raise ApiError(400, "stream takes one prompt: send several prompts without stream", param="stream")
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(
                400, "best_of must equal n: nanoseek returns every choice it generates, unranked", param="best_of"
            )
        ticket = service.admit(body, body.n * len(prompts), key)
        with ticket.released_on_error():
            return await complete(body, request, key, ticket, prompts)

    async def complete(body: CompletionRequest, request: Request, key: str, ticket: Ticket, prompts: list):
        encoded = await service.completion_prompts(prompts, body.suffix)
        scored = body.logprobs if body.scoring else None  # echo with logprobs: the prompt's log-probs too
        if scored is not None:
            entries = sum(len(ids) + body.max_tokens for ids in encoded) * body.n * (scored + 1)
            if entries > MAX_SCORED_ENTRIES:
                raise errors.too_many_scored(entries, MAX_SCORED_ENTRIES)
        sampling = [service.sampling_params(body, p, body.max_tokens, body.logprobs, "prompt", scored) for p in encoded]
        jobs = list(zip(encoded, sampling, strict=True))
        meters = await service.reserve(key, jobs)
        # Every prompt goes to the engine before any is awaited, so they batch.
        generations = [
            service.start(ids, params, key, meter, ticket) for (ids, params), meter in zip(jobs, meters, strict=True)
        ]
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "system_fingerprint": service.fingerprint,
        }

        def echoed(p: int) -> str:
            return "" if not body.echo else prompts[p] if isinstance(prompts[p], str) else tokenizer.decode(encoded[p])

        def logprobs_of(out: RequestOutput, new: slice = slice(None), offset: int = 0) -> dict | None:
            """offset: where the first of these tokens lies in the whole text (the echoed prompt included)."""
            if body.logprobs is None:
                return None
            if body.scoring:  # the prompt's tokens first (the first scored by nothing), then the reply's
                ids, logprobs = out.prompt_token_ids + out.token_ids, out.prompt_logprobs + out.logprobs
                return completion_logprobs(tokenizer, ids, logprobs)
            return completion_logprobs(tokenizer, out.token_ids[new], out.logprobs[new], offset)

        def usage_now() -> dict:
            return usage(
                sum(len(ids) for ids, _ in jobs),
                sum(g.cached for g in generations),
                sum(g.completion for g in generations),
            )

        if not body.stream:
            try:
                results = await asyncio.gather(*(service.collect(request, g) for g in generations))
            finally:
                for g in generations:
                    g.close()

            def answer() -> dict:
                choices = [
                    {
                        "index": p * body.n + j,
                        "text": echoed(p) + out.text,
                        "logprobs": logprobs_of(out, offset=len(echoed(p))),
                        "finish_reason": out.finish_reason,
                    }
                    for p, outs in enumerate(results)
                    for j, out in enumerate(outs)
                ]
                return head | {"choices": choices, "usage": usage_now()}

            if body.logprobs is None:
                return answer()
            # log-probabilities can run to megabytes of JSON: built and encoded off the event loop
            content = await asyncio.to_thread(lambda: json.dumps(answer()).encode())
            return Response(content, media_type="application/json")

        base = head | ({"usage": None} if body.include_usage else {})
        deltas, sent_logprobs = [TextDeltas(body.stop_list) for _ in range(body.n)], [0] * body.n
        offsets = [len(echoed(0))] * body.n  # text_offset runs on across chunks, as in the whole text

        def chunk(j: int, text: str, logprobs: dict | None = None, finish: str | None = None) -> str:
            return sse(base | {"choices": [{"index": j, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        def chunks(j: int, out: RequestOutput, finished: bool):
            piece = deltas[j].advance({"reasoning_content": "", "content": out.text}, finished).get("content")
            if piece or finished:  # log-probs of held-back tokens go with the next chunk
                new = slice(sent_logprobs[j], len(out.logprobs))
                yield chunk(j, piece or "", logprobs_of(out, new, offsets[j]), out.finish_reason)
                offsets[j] += sum(len(tokenizer.decode([t])) for t in out.token_ids[new])
                sent_logprobs[j] = len(out.logprobs)

        opening = [chunk(j, echoed(0)) for j in range(body.n if body.echo else 0)]
        closing = lambda: [sse(base | {"choices": [], "usage": usage_now()})] if body.include_usage else []  # noqa: E731
        return EventStream(generations[0], stream_events(generations[0], opening, chunks, closing))

    return app


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
