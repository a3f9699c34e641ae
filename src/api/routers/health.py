"""Liveness and readiness, for orchestrators; no key needed."""

from __future__ import annotations

from typing import Any, Literal

import anyio
import anyio.to_thread
from eventsourcing.postgres import PostgresApplicationRecorder
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from api.deps import RuntimeDep
from api.metrics import exposition
from api.recorder import connection_lost
from api.runtime import Runtime
from projections.data_version import newer_data_version

router = APIRouter(tags=["health"])


class ReadyOut(BaseModel):
    """Readiness, and each check's result (`writer`, `writer_stuck`, `database`,
    `newer_data`, `position`, …), as `GET /readyz` answers it, ready (200) or not (503)."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, Any]


# Probes never wait behind requests: `/healthz` runs on the event loop, and `/readyz` reads
# the database on threads of its own. On the shared pool (40 threads), reads waiting for a
# lagging view (`min_position`) held every thread, and both probes took as long as they
# did (4.8 s): an orchestrator would have restarted a server that was only waiting.
_PROBE_THREADS = 2
_probe_limiter: anyio.CapacityLimiter | None = None


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyOut)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """The database answers and the writer runs and gets through its batches: the service
    can take commands."""
    global _probe_limiter
    if _probe_limiter is None:  # made on the event loop, where anyio needs it
        _probe_limiter = anyio.CapacityLimiter(_PROBE_THREADS)
    return await anyio.to_thread.run_sync(_readiness, runtime, limiter=_probe_limiter)


def _readiness(runtime: Runtime) -> JSONResponse:
    writer = runtime.writer
    busy = writer.busy_seconds
    checks: dict[str, Any] = {
        "writer": writer.alive,
        # A batch this long is a save that does not come back: its thread lives, yet every
        # command times out behind it.
        "writer_stuck": busy >= runtime.settings.writer_stuck_seconds,
        "writer_busy_seconds": round(busy, 3),
        "writer_batches": writer.batches,
        "writer_commands": writer.commands,
        "writer_conflicts": writer.conflicts,
        "writer_exclusive": writer.exclusive,
    }
    try:
        # One try, no retries: a probe must answer quickly, and truthfully.
        recorder = runtime.app.recorder
        assert isinstance(recorder, PostgresApplicationRecorder)
        with recorder.datastore.get_connection() as conn:
            row = conn.execute(
                "SELECT max(notification_id) AS position FROM inventoryledger_events"
            ).fetchone()
            # Newer code migrated the database while this process ran: it is to be
            # replaced, not sent requests (an upgrade walkthrough: an old process answered
            # 500 on what the new one wrote, and kept taking requests).
            checks["newer_data"] = newer_data_version(conn)
        checks["position"] = (row or {}).get("position") or 0
        checks["database"] = True
    except Exception as error:  # any failure means not ready; say which
        checks["database"] = False
        checks["database_error"] = type(error).__name__
        if connection_lost(error):
            runtime.renew_connections()  # the pools' other connections may be as dead
    ready = bool(
        checks["writer"]
        and not checks["writer_stuck"]
        and checks["database"]
        and checks.get("newer_data") is None
    )
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", response_class=Response)
def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus exposition: the writers' counts and the views' and feeds' state."""
    body, content_type = exposition(runtime)
    return Response(body, media_type=content_type)
