"""The caller's money: GET /v1/billing (its totals, cost, balance and the price table) and DeepSeek's
GET /user/balance. The ledger is SQLite: read off the event loop; a ledger that cannot be read, or takes no
writes (its numbers would miss the usage it keeps in memory), is the 503 a billed request gets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from fastapi import APIRouter

from nanoseek.serve import errors
from nanoseek.serve.ledger import LedgerUnavailable
from nanoseek.serve.protocol import BalanceInfo, BillingSummary, UserBalance
from nanoseek.serve.routes.common import ApiKey, ServiceDep, error_docs

router = APIRouter()
T = TypeVar("T")


async def read(fn: Callable[..., T], *args) -> T:
    """A ledger read, off the event loop; 503 when the ledger is unavailable."""
    try:
        return await asyncio.to_thread(fn, *args)
    except LedgerUnavailable as e:
        raise errors.ledger_unavailable(str(e)) from None


@router.get("/v1/billing", response_model=BillingSummary, responses=error_docs(401, 503))
async def billing(service: ServiceDep, key: ApiKey) -> BillingSummary:
    """This key's token totals, their cost, its balance, and the price table."""
    return BillingSummary.model_validate(await read(service.admission.ledger.summary, key))


@router.get("/user/balance", response_model=UserBalance, responses=error_docs(401, 503))
async def balance(service: ServiceDep, key: ApiKey) -> UserBalance:
    """DeepSeek's balance shape; available while the balance, less open requests, pays for a minimal one."""
    ledger = service.admission.ledger
    account = await read(ledger.account, key, True)
    left = account.balance()
    amount = f"{left:.2f}" if left is not None else "inf"
    info = BalanceInfo(
        currency=ledger.prices.currency, total_balance=amount, granted_balance=amount, topped_up_balance="0.00"
    )
    return UserBalance(is_available=account.can_afford(ledger.minimal_cost()), balance_infos=[info])
