"""Dependencies published as Annotated aliases for the routers.

They do no I/O on the event loop's thread, so they are coroutines: FastAPI runs them on
the loop instead of sending each to the thread pool and back (`view_at` awaits a read
made on a thread of its own).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel

from api.auth import authorise, guards, require
from api.runtime import Runtime
from api.schemas import SUPPLIER_ID_PATTERN
from api.settings import ApiKey
from ledger.base import Cause


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def now() -> datetime:
    """The time a command happens at; the domain never reads the clock itself."""
    return datetime.now(UTC)


async def request_id(request: Request) -> str:
    value: str = request.state.request_id
    return value


# Log positions are PostgreSQL bigints: one beyond is never reached, and a read waiting
# for it would wait its whole time for a 503 that says to try again.
MAX_POSITION = 2**63 - 1
PositionQuery = Annotated[int | None, Query(alias="min_position", ge=0, le=MAX_POSITION)]
PositionHeader = Annotated[int | None, Header(alias="X-Min-Position", ge=0, le=MAX_POSITION)]


async def min_position(query: PositionQuery = None, header: PositionHeader = None) -> int | None:
    """Read-your-writes: the log position the answer must reflect (query or header)."""
    return query if query is not None else header


POSITION_HEADER = "X-Ledger-Position"


def set_position(response: Response, position: int | None) -> None:
    """Tells the client how far the log reached, for read-your-writes."""
    if position is not None:
        response.headers[POSITION_HEADER] = str(position)


def model_answer(body: BaseModel, position: int | None, status: int = 200) -> Response:
    """The answer model as JSON, with the log position: built and checked once, by the
    route (FastAPI would validate a returned model again)."""
    return json_answer(body.model_dump_json(), position, status)


def json_answer(content: bytes | str, position: int | None, status: int = 200) -> Response:
    """An answer already written as JSON (see api.answers), with the log position."""
    answer = Response(content, status_code=status, media_type="application/json")
    set_position(answer, position)
    return answer


def cause_for(key: ApiKey, reason: str, correlation_id: str) -> Cause:
    return Cause(actor=key.name, reason=reason, correlation_id=correlation_id)


READERS = frozenset({"storefront", "oms", "auditor"})
OMS = frozenset({"oms"})


@dataclass(frozen=True, slots=True)
class Read:
    """What a read of the stock view needs, gathered by one dependency: availability is
    the hottest path of the service, and each dependency FastAPI solves costs about as
    much as the read itself."""

    runtime: Runtime
    at: datetime
    wanted: int | None


@guards(READERS)
async def read(
    request: Request, query: PositionQuery = None, header: PositionHeader = None
) -> Read:
    """A reader's request: its key checked, the time it reads at, the position it wants."""
    authorise(request, READERS)
    return Read(
        runtime=await get_runtime(request),
        at=await now(),
        wanted=await min_position(query, header),
    )


@dataclass(frozen=True, slots=True)
class OmsWrite:
    """What an OMS command needs, gathered by one dependency (reserving is the hottest
    write): the runtime, the caller's key, the time it happens at and the request id."""

    runtime: Runtime
    key: ApiKey
    at: datetime
    request_id: str


@guards(OMS)
async def oms_write(request: Request) -> OmsWrite:
    return OmsWrite(
        runtime=await get_runtime(request),
        key=authorise(request, OMS),
        at=await now(),
        request_id=await request_id(request),
    )


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
OmsWriteDep = Annotated[OmsWrite, Depends(oms_write)]
ReadDep = Annotated[Read, Depends(read)]
MinPosition = Annotated[int | None, Depends(min_position)]


def view_at(projection: str) -> Callable[..., Awaitable[int | None]]:
    """A dependency: the position the answer must reflect (`min_position`), once the
    projection's view has reached it, waited for on the event loop (`Views.reach`), so
    that the route's own read on a thread finds it there and holds the thread no longer
    than the read."""

    async def reached(runtime: RuntimeDep, wanted: MinPosition) -> int | None:
        await runtime.views.reach(projection, wanted, runtime.settings.read_wait_max_seconds)
        return wanted

    return reached


ReservationsAt = Annotated[int | None, Depends(view_at("reservations"))]
ConflictsAt = Annotated[int | None, Depends(view_at("conflicts"))]
MappingsAt = Annotated[int | None, Depends(view_at("mappings"))]
StockAt = Annotated[int | None, Depends(view_at("stock"))]
Now = Annotated[datetime, Depends(now)]
RequestId = Annotated[str, Depends(request_id)]
SupplierId = Annotated[str, Path(pattern=SUPPLIER_ID_PATTERN)]

AdminKey = Annotated[ApiKey, Depends(require("admin"))]
OmsKey = Annotated[ApiKey, Depends(require("oms"))]
SupplierKey = Annotated[ApiKey, Depends(require("supplier"))]
AuditorKey = Annotated[ApiKey, Depends(require("auditor"))]
# The OMS, or an auditor following a reservation named in a SKU's history (reads only).
ReservationReaderKey = Annotated[ApiKey, Depends(require("oms", "auditor"))]
# A supplier (its own deliveries), an auditor or an admin.
FeedReaderKey = Annotated[ApiKey, Depends(require("supplier", "auditor"))]
