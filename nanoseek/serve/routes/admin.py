"""The operator's routes: GET /health (load balancers), GET /metrics (Prometheus; with --api-keys, for the
--admin-key only) and the chat page at /."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from nanoseek.serve.protocol import Health, HealthUnavailable
from nanoseek.serve.routes.common import ServiceDep

router = APIRouter()


@router.get("/", include_in_schema=False)
async def chat_page() -> HTMLResponse:
    return HTMLResponse(resources.files("nanoseek.serve").joinpath("static/index.html").read_text())


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": HealthUnavailable, "description": "this server cannot take requests"}},
)
async def health(service: ServiceDep) -> Health | JSONResponse:
    # a failed engine, or a ledger that takes no writes
    reason = service.runner.failed or service.admission.ledger.unavailable
    if reason is not None:
        return JSONResponse(HealthUnavailable(status="unavailable", reason=reason).model_dump(), status_code=503)
    stats = service.engine.stats()
    return Health(status="ok", running=stats["running"], waiting=stats["waiting"], pending=service.runner.pending)


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request, service: ServiceDep) -> Response:
    service.admission.authorize_admin(request)
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
