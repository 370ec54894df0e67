"""The API's routes, one module per endpoint family (after vLLM's api_router): each an APIRouter whose
handlers reach the Service through app.state (common.py's dependencies). They only shape requests and
responses; admission.py authenticates, admits and bills, preprocess.py builds prompts and sampling
parameters, service.py runs generations, generation.py streams them."""

from __future__ import annotations

from fastapi import APIRouter

from nanoseek.serve.routes import admin, billing, chat, completions, models, tokenizer

ROUTERS: tuple[APIRouter, ...] = (
    admin.router,
    models.router,
    billing.router,
    tokenizer.router,
    chat.router,
    completions.router,
)
