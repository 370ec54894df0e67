"""GET /v1/models: the names this server answers to (--served-model-name, --reasoning-model-name)."""

from __future__ import annotations

from fastapi import APIRouter

from nanoseek.serve.protocol import ModelCard, ModelList
from nanoseek.serve.routes.common import ApiKey, ServiceDep, error_docs

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=error_docs(401))
async def models(service: ServiceDep, key: ApiKey) -> ModelList:
    cards = [
        ModelCard(id=name, object="model", created=service.created, owned_by="nanoseek") for name in service.cfg.names
    ]
    return ModelList(object="list", data=cards)
