"""The baseline: a minimal FastAPI + psycopg service, one conditional UPDATE per reservation.

Run by the benchmark as `uvicorn bench.baseline_app:app` with BASELINE_DATABASE_URL set.
It keeps no history, no allocation and no idempotency: the floor any ledger must beat.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from psycopg_pool import ConnectionPool
from pydantic import BaseModel

pool = ConnectionPool(
    os.environ.get("BASELINE_DATABASE_URL", ""), min_size=4, max_size=8, open=False
)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    pool.open(wait=True)
    yield
    pool.close()


app = FastAPI(lifespan=lifespan)


class Line(BaseModel):
    sku: str
    quantity: int


class Order(BaseModel):
    order_id: str
    lines: list[Line]


@app.post("/v1/reservations", status_code=201)
def reserve(order: Order, idempotency_key: str = Header(alias="Idempotency-Key")) -> JSONResponse:
    line = order.lines[0]
    with pool.connection() as conn:
        row = conn.execute(
            "UPDATE baseline_stock SET reserved = reserved + %s"
            " WHERE sku = %s AND on_hand - reserved >= %s RETURNING reserved",
            (line.quantity, line.sku, line.quantity),
        ).fetchone()
    if row is None:
        return JSONResponse({"error": "insufficient_stock"}, status_code=409)
    return JSONResponse({"order_id": order.order_id, "key": idempotency_key}, status_code=201)


@app.get("/constant")
def constant() -> dict[str, object]:
    return {"sku": "X", "available": 42, "status": "in_stock"}
