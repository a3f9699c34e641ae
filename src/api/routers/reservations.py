"""The OMS reservation lifecycle: reserve, read, confirm, release, fulfil, return."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Query, Response

from api.answers import reservation_fields, written
from api.deps import (
    MinPosition,
    Now,
    OmsKey,
    OmsWrite,
    OmsWriteDep,
    RequestId,
    ReservationReaderKey,
    ReservationsAt,
    RuntimeDep,
    cause_for,
    json_answer,
    model_answer,
    set_position,
)
from api.errors import ApiError, invalid
from api.schemas import (
    PRINTABLE,
    AllocationOut,
    CancelIn,
    ConfirmIn,
    ExtendIn,
    FulfilIn,
    ReleaseIn,
    ReservationIn,
    ReservationLineOut,
    ReservationListOut,
    ReservationOut,
    ReturnIn,
)
from api.settings import ApiKey
from ledger.commands import Cancel, Command, Confirm, Extend, Fulfil, Release, Reserve, Return
from ledger.errors import ReservationNotFound
from ledger.handlers.reservations import Reserved
from ledger.reservation import Reservation, ReservationStatus
from ledger.writer import Outcome
from projections.queries import PositionNotReached

router = APIRouter(prefix="/v1/reservations", tags=["reservations"])

_VALID_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]


def reservation_out(reservation: Reservation, at: datetime) -> ReservationOut:
    return ReservationOut(
        reservation_id=str(reservation.id),
        order_id=reservation.order_id,
        status=reservation.status_at(at),
        expires_at=reservation.expires_at,
        created_at=reservation.created_on,
        confirmed_at=reservation.confirmed_at,
        lines=[
            ReservationLineOut(
                sku=line.sku,
                quantity=line.quantity,
                fulfilled=line.fulfilled_quantity,
                returned=sum(line.returned.values()),
                cancelled=sum(reservation.cancelled_on(line).values()),
                allocations=[
                    AllocationOut(
                        supplier_id=supplier,
                        quantity=quantity,
                        fulfilled=line.fulfilled.get(supplier, 0),
                        returned=line.returned.get(supplier, 0),
                        cancelled=reservation.cancelled_on(line).get(supplier, 0),
                    )
                    for supplier, quantity in line.allocations.items()
                ],
            )
            for line in reservation.lines.values()
        ],
    )


def _key(value: str | None, required: bool) -> str | None:
    if value is None:
        if required:
            raise ApiError(
                400, "missing_idempotency_key", "send an Idempotency-Key header with each order"
            )
        return None
    if not _VALID_KEY.match(value):
        raise ApiError(
            400, "invalid_idempotency_key", "1 to 255 printable ASCII characters, no spaces"
        )
    return value


def _reservation_id(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        # Not echoed: a path may hold anything (a NUL came back; an OMS walkthrough).
        raise ReservationNotFound("no such reservation: its id is a UUID") from None


def _client(key: ApiKey) -> str | None:
    """The OMS client a key acts as, for reservations (see ledger.commands.CLIENT_SCOPED):
    an OMS key its own name; an admin or an auditor none, seeing every client's."""
    return key.name if key.role == "oms" else None


def _owned(reservation: Reservation, key: ApiKey) -> Reservation:
    """The reservation, unless another OMS client placed it: not found for this one."""
    client = _client(key)
    if client is not None and reservation.client != client:
        raise ReservationNotFound(f"no reservation {reservation.id}")
    return reservation


def _within_longest_hold(ttl_seconds: int, longest: int) -> None:
    if ttl_seconds > longest:
        raise ApiError(422, "ttl_too_long", f"ttl_seconds is at most {longest}")


# The write routes are coroutines: they hand the command to the ledger writer's thread
# and await its outcome, holding no pool thread while the batch is saved.


def reserve_command(write: OmsWrite, body: ReservationIn, idempotency_key: str | None) -> Reserve:
    """The command for an order; an ApiError for what the HTTP layer refuses. The route
    and the fast lane (api.fastlane) both build it here."""
    settings = write.runtime.settings
    idempotency = _key(idempotency_key, required=True)
    assert idempotency is not None
    if len(body.lines) > settings.max_reservation_lines:
        raise ApiError(
            422, "too_many_lines", f"at most {settings.max_reservation_lines} lines an order"
        )
    if body.ttl_seconds is not None:
        _within_longest_hold(body.ttl_seconds, settings.max_ttl_seconds)
    return Reserve(
        at=write.at,
        cause=cause_for(write.key, "oms.reserve", write.request_id),
        client=write.key.name,
        idempotency_key=idempotency,
        order_id=body.order_id,
        lines=[(line.sku, line.quantity) for line in body.lines],
        ttl_seconds=body.ttl_seconds,
        default_ttl_seconds=settings.default_ttl_seconds,
    )


def reserved(outcome: Outcome[Reserved], at: datetime) -> Response:
    """The answer to an order the ledger took; or had taken: a replay says so, and is
    answered as the order was first (the reservation as placed, then), whatever became
    of it since (`GET /v1/reservations/{id}` tells that)."""
    reservation = outcome.value.reservation
    if outcome.value.replayed:
        at = reservation.created_on
    content = written(reservation_fields(reservation, at), lambda: reservation_out(reservation, at))
    answer = json_answer(content, outcome.position, 201)
    if outcome.value.replayed:
        answer.headers["Idempotent-Replayed"] = "true"
    return answer


@router.post("", status_code=201, response_model=ReservationOut)
async def reserve(
    body: ReservationIn,
    write: OmsWriteDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Holds stock for every line of an order, or for none; the answer says who ships what."""
    command = reserve_command(write, body, idempotency_key)
    return reserved(await write.runtime.writer.execute_async(command), write.at)


# The reservations of one order listed, the first made.
ORDER_LISTED = 100


@router.get("", response_model=ReservationListOut)
def listed(
    key: ReservationReaderKey,
    runtime: RuntimeDep,
    at: Now,
    wanted: ReservationsAt,
    response: Response,
    order_id: Annotated[str | None, Query(min_length=1, max_length=200, pattern=PRINTABLE)] = None,
    status: ReservationStatus | None = None,
    after: Annotated[UUID | None, Query(description="reservation id cursor")] = None,
    limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
) -> ReservationListOut:
    """The reservations of an order (the first 100 made, of a `status` if given); or,
    without `order_id`, every reservation (of a `status`, as answered now), by id, a
    page at a time: an OMS reconciling its open holds and commitments pages through them
    with `after=next_after`."""
    if order_id is not None and (after is not None or limit is not None):
        paged = "after" if after is not None else "limit"
        raise invalid(
            ["query", paged], "after and limit page the listing without order_id", "excluded"
        )
    position = runtime.views.wait_for(
        "reservations", wanted, runtime.settings.read_wait_max_seconds
    )
    set_position(response, position)
    named = None if status is None else status.value
    if order_id is not None:
        found = runtime.views.reservations_for_order(
            order_id, limit=ORDER_LISTED + 1, status=named, at=at, client=_client(key)
        )
        return ReservationListOut(
            items=[reservation_out(r, at) for r in found[:ORDER_LISTED]],
            position=position,
            truncated=len(found) > ORDER_LISTED,
        )
    limit = limit or 100
    page = runtime.views.reservations_by_status(named, at, after, limit, client=_client(key))
    return ReservationListOut(
        items=[reservation_out(r, at) for r in page],
        position=position,
        next_after=str(page[-1].id) if len(page) == limit else None,
    )


@router.get("/{reservation_id}", response_model=ReservationOut)
def get(
    reservation_id: str,
    key: ReservationReaderKey,
    runtime: RuntimeDep,
    at: Now,
    wanted: MinPosition,
    response: Response,
) -> ReservationOut:
    """A reservation from the view; one the view does not hold yet, or holds short of
    `min_position`, comes from the log, which holds every write: such a read never waits
    for the view (it waited, and was refused `503` when the view lagged, though the log
    had the answer: a walkthrough)."""
    wanted_id = _reservation_id(reservation_id)
    position = runtime.views.position("reservations")
    reservation = None
    if wanted is None or position >= wanted:
        reservation = runtime.views.reservation(wanted_id)
    if reservation is None:
        # Read before the reservation is: what is loaded reflects at least this.
        head = runtime.app.recorder.max_notification_id() or 0
        if wanted is not None and wanted > head:
            raise PositionNotReached("reservations", wanted, position, head)
        reservation = runtime.queries.reservation(wanted_id)
        position = max(position, head)
    set_position(response, position)
    return reservation_out(_owned(reservation, key), at)


@router.get("/{reservation_id}/history")
def history(
    reservation_id: str,
    key: ReservationReaderKey,
    runtime: RuntimeDep,
    after_version: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Every event of the reservation in order, from the log: position, time, type, payload
    (a cancel's lines and reason, say), actor, reason, request; an OMS key reads its own."""
    wanted = _reservation_id(reservation_id)
    _owned(runtime.queries.reservation(wanted), key)  # not found, or another client's
    events = runtime.audit.reservation_history(wanted, after_version, limit)
    return {
        "reservation_id": str(wanted),
        "items": [event.as_json() for event in events],
        "next_after_version": events[-1].version if len(events) == limit else None,
    }


async def _run(
    runtime: RuntimeDep, command: Command, at: datetime, request_key: str | None = None
) -> Response:
    outcome = await runtime.writer.execute_async(command)
    answer = model_answer(reservation_out(outcome.value, at), outcome.position)
    if request_key is not None and not outcome.wrote:
        # A fulfil or return with a key already applied wrote nothing: a replay says so,
        # as an order's does (only the position header's absence told, and not when it
        # shared a batch with a write to its reservation: walkthroughs).
        answer.headers["Idempotent-Replayed"] = "true"
    return answer


@router.post("/{reservation_id}/confirm", response_model=ReservationOut)
async def confirm(
    reservation_id: str,
    key: OmsKey,
    runtime: RuntimeDep,
    at: Now,
    request_id: RequestId,
    body: ConfirmIn | None = None,
) -> Response:
    """Turns the hold into a commitment (idempotent). It takes no body, or an empty JSON
    object: a body with fields is `422`."""
    command = Confirm(
        at=at,
        cause=cause_for(key, "oms.confirm", request_id),
        reservation_id=_reservation_id(reservation_id),
        client=_client(key),
    )
    return await _run(runtime, command, at)


@router.post("/{reservation_id}/extend", response_model=ReservationOut)
async def extend(
    reservation_id: str,
    body: ExtendIn,
    key: OmsKey,
    runtime: RuntimeDep,
    at: Now,
    request_id: RequestId,
) -> Response:
    """Keeps a hold for `ttl_seconds` from now, where that is longer than it had left (a
    checkout waiting on its payment); one with less time changes nothing."""
    _within_longest_hold(body.ttl_seconds, runtime.settings.max_ttl_seconds)
    command = Extend(
        at=at,
        cause=cause_for(key, "oms.extend", request_id),
        reservation_id=_reservation_id(reservation_id),
        client=_client(key),
        ttl_seconds=body.ttl_seconds,
    )
    return await _run(runtime, command, at)


@router.post("/{reservation_id}/release", response_model=ReservationOut)
async def release(
    reservation_id: str,
    key: OmsKey,
    runtime: RuntimeDep,
    at: Now,
    request_id: RequestId,
    body: ReleaseIn | None = None,
) -> Response:
    """Cancels whatever has not shipped (idempotent)."""
    command = Release(
        at=at,
        cause=cause_for(key, "oms.release", request_id),
        reservation_id=_reservation_id(reservation_id),
        client=_client(key),
        note=body.reason if body else None,
    )
    return await _run(runtime, command, at)


@router.post("/{reservation_id}/fulfil", response_model=ReservationOut)
async def fulfil(
    reservation_id: str,
    body: FulfilIn,
    key: OmsKey,
    runtime: RuntimeDep,
    at: Now,
    request_id: RequestId,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Records shipped units, all at once or in parts; an Idempotency-Key makes it safe to retry."""
    command = Fulfil(
        at=at,
        cause=cause_for(key, "oms.fulfil", request_id),
        reservation_id=_reservation_id(reservation_id),
        client=_client(key),
        lines=[(line.sku, line.quantity, line.supplier_id) for line in body.lines],
        request_key=_key(idempotency_key, required=False),
    )
    return await _run(runtime, command, at, command.request_key)


@router.post("/{reservation_id}/cancel", response_model=ReservationOut)
async def cancel(
    reservation_id: str,
    body: CancelIn,
    key: OmsKey,
    runtime: RuntimeDep,
    at: Now,
    request_id: RequestId,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Cancels units of some lines before they ship (a customer dropped an item, a pick came
    up short): a hold's units are free again, as are a commitment's; the rest of the order
    stands. With nothing left open it is closed (`released`, or `fulfilled` where something
    shipped). An Idempotency-Key makes it safe to retry."""
    command = Cancel(
        at=at,
        cause=cause_for(key, "oms.cancel", request_id),
        reservation_id=_reservation_id(reservation_id),
        client=_client(key),
        lines=[(line.sku, line.quantity, line.supplier_id) for line in body.lines],
        note=body.reason,
        request_key=_key(idempotency_key, required=False),
    )
    return await _run(runtime, command, at, command.request_key)


@router.post("/{reservation_id}/return", response_model=ReservationOut)
async def return_units(
    reservation_id: str,
    body: ReturnIn,
    key: OmsKey,
    runtime: RuntimeDep,
    at: Now,
    request_id: RequestId,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Records units coming back; `restock` makes them sellable again until the next report."""
    command = Return(
        at=at,
        cause=cause_for(key, "oms.return", request_id),
        reservation_id=_reservation_id(reservation_id),
        client=_client(key),
        lines=[(line.sku, line.quantity, line.supplier_id) for line in body.lines],
        restock=body.restock,
        request_key=_key(idempotency_key, required=False),
    )
    return await _run(runtime, command, at, command.request_key)
