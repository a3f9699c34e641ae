"""Suppliers, their SKU mappings, and the stock they report."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Query, Response
from pydantic import ValidationError

from api.deps import (
    AdminKey,
    AuditorKey,
    MappingsAt,
    Now,
    RequestId,
    RuntimeDep,
    SupplierId,
    SupplierKey,
    cause_for,
    set_position,
)
from api.errors import ApiError
from api.runtime import Runtime
from api.schemas import (
    NOT_PRINTABLE,
    MappingIn,
    MappingsIn,
    ObservationIn,
    RejectedOut,
    StockReportIn,
    StockReportOut,
    SupplierIn,
    SupplierOut,
    UpsertOut,
)
from connectors import health, inbox
from connectors.deadletters import record_dead_letters
from connectors.normalise import FeedRules, observed_utc, record_fields, unit_factor
from connectors.outcome import Rejections
from connectors.parsers import Incoming, Record
from ledger.commands import Observation, PutMappings, PutSupplier, ReportStock
from ledger.delivery import DeliveryOutcome, Rejection, kept
from ledger.errors import UnknownSupplier
from ledger.handlers.catalogue import Upserted
from ledger.mapping import MappingSpec
from ledger.supplier import SupplierTerms
from projections.leases import lock_key
from projections.queries import PositionNotReached

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/suppliers", tags=["suppliers"])


@router.put("/{supplier_id}", response_model=UpsertOut)
def put_supplier(
    supplier_id: SupplierId,
    body: SupplierIn,
    key: AdminKey,
    runtime: RuntimeDep,
    at: Now,
    request_id: RequestId,
    response: Response,
) -> UpsertOut:
    """Creates or updates a supplier; only the terms that change are recorded. An existing
    supplier keeps every term the body leaves out (`connector: {}` clears its connector):
    changing a priority never stops its feed, and changing its feed never resets its time
    zone (which read every later report's times in UTC, some then dropped as late). A new
    supplier without a name is named by its id."""
    terms = SupplierTerms(**{**body.model_dump(), "name": body.name or supplier_id})
    command = PutSupplier(
        at=at,
        cause=cause_for(key, "admin.supplier.put", request_id),
        supplier_id=supplier_id,
        terms=terms,
        # A null name is one left out: kept (it renamed the supplier to its id).
        kept=frozenset(SupplierIn.model_fields) - body.model_fields_set
        | ({"name"} if body.name is None else set()),
    )
    outcome = runtime.writer.execute(command)
    set_position(response, outcome.position)
    return upsert_out(outcome.value, outcome.position)


@router.get("/{supplier_id}", response_model=SupplierOut)
def get_supplier(supplier_id: SupplierId, _: AdminKey, runtime: RuntimeDep) -> SupplierOut:
    supplier = runtime.queries.supplier(supplier_id)
    if supplier is None:
        raise UnknownSupplier(f"unknown supplier {supplier_id!r}")
    return SupplierOut(supplier_id=supplier_id, **supplier.terms.as_dict())


@router.put("/{supplier_id}/mappings", response_model=UpsertOut)
def put_mappings(
    supplier_id: SupplierId,
    body: MappingsIn,
    key: AdminKey,
    runtime: RuntimeDep,
    at: Now,
    request_id: RequestId,
    response: Response,
) -> UpsertOut:
    """Upserts SKU mappings in bulk; a SKU named for the first time joins the catalogue.
    A supplier SKU mapped away from a SKU retires the supplier's level there, and takes
    it along where it was its alone (see ledger.handlers.catalogue)."""
    # One mapping PUT of a supplier at a time, in every process: the next reads the
    # mappings view once the one before is in it. Read before it saved, a PUT missed a
    # supplier SKU the other moved onto a SKU, and moved that one's level with its own
    # (a review).
    with runtime.store.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(f"mappings:{supplier_id}"),))
        command = PutMappings(
            at=at,
            cause=cause_for(key, "admin.mappings.put", request_id),
            supplier_id=supplier_id,
            mappings=[MappingSpec(**mapping.model_dump()) for mapping in body.mappings],
            **_still_mapped(runtime, supplier_id, body.mappings),
        )
        outcome = runtime.writer.execute(command)
    set_position(response, outcome.position)
    return upsert_out(outcome.value, outcome.position)


def _still_mapped(runtime: Runtime, supplier_id: str, mappings: list[MappingIn]) -> dict[str, Any]:
    """Of the SKUs these mappings move a supplier SKU away from, those another SKU of the
    supplier maps to, each with those supplier SKUs (`kept`), by the mappings view once
    it has every mapping made before (waited for a little), and whether it had
    (`view_complete`). The ledger checks them against its own mappings: on such a SKU
    the supplier's level is not the leaving supplier SKU's alone, and does not move with
    it. A view that had not every mapping may miss one: then no level moves."""
    wanted = {m.supplier_sku: m.sku for m in mappings}
    head = runtime.app.recorder.max_notification_id() or 0
    complete = True
    try:
        runtime.views.wait_for("mappings", head, MAPPING_WAIT_SECONDS)
    except PositionNotReached:
        log.warning("mappings.view_behind", supplier=supplier_id, wanted=head)
        complete = False
    with runtime.store.connection() as conn:
        rows = conn.execute(
            "SELECT supplier_sku, sku FROM view_mappings"
            " WHERE supplier_id = %s AND supplier_sku = ANY(%s)",
            (supplier_id, list(wanted)),
        ).fetchall()
        left = {r["sku"] for r in rows if r["sku"] != wanted[r["supplier_sku"]]}
        if not left:
            return {"kept": frozenset(), "view_complete": complete}
        kept = conn.execute(
            "SELECT sku, supplier_sku FROM view_mappings"
            " WHERE supplier_id = %s AND sku = ANY(%s) AND NOT supplier_sku = ANY(%s)",
            (supplier_id, sorted(left), list(wanted)),
        ).fetchall()
    return {
        "kept": frozenset((r["sku"], r["supplier_sku"]) for r in kept),
        "view_complete": complete,
    }


def upsert_out(upserted: Upserted, position: int | None) -> UpsertOut:
    return UpsertOut(
        created=upserted.created,
        updated=upserted.updated,
        unchanged=upserted.unchanged,
        position=position,
    )


@router.get("/{supplier_id}/mappings")
def get_mappings(
    supplier_id: SupplierId,
    _: AuditorKey,
    runtime: RuntimeDep,
    wanted: MappingsAt,
    response: Response,
    after: Annotated[
        str,
        Query(
            max_length=128,
            pattern=rf"^[^{NOT_PRINTABLE}]*$",
            description="supplier_sku cursor",
        ),
    ] = "",
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    """A supplier's mappings from the mappings view, by supplier SKU; page on with `after`.
    With `min_position`, once the view has reached it (a mapping just put, say)."""
    position = runtime.views.wait_for("mappings", wanted, runtime.settings.read_wait_max_seconds)
    set_position(response, position)
    rows = runtime.views.mappings(supplier_id, after, limit)
    # As the PUT does; only an empty page asks, since mappings exist only for a supplier.
    if not rows and runtime.queries.supplier(supplier_id) is None:
        raise UnknownSupplier(f"unknown supplier {supplier_id!r}")
    return {
        "mappings": rows,
        "next_after": rows[-1]["supplier_sku"] if len(rows) == limit else None,
    }


@router.post("/{supplier_id}/stock", response_model=StockReportOut)
def report_stock(
    supplier_id: SupplierId,
    body: StockReportIn,
    key: SupplierKey,
    runtime: RuntimeDep,
    at: Now,
    request_id: RequestId,
    response: Response,
) -> StockReportOut:
    """Applies a batch of absolute levels; bad records are refused one by one, with reasons."""
    if key.role == "supplier" and key.supplier_id != supplier_id:
        raise ApiError(403, "forbidden", "this key reports for another supplier")
    limit = runtime.settings.max_observations
    if len(body.observations) > limit:
        raise ApiError(422, "too_many_observations", f"at most {limit} observations a request")
    supplier = runtime.queries.supplier(supplier_id)
    if supplier is None:
        raise UnknownSupplier(f"unknown supplier {supplier_id!r}")
    observations, rejected = parse_observations(
        body.observations,
        supplier.terms,
        at,
        our_skus=None if key.role == "admin" else _mapped(runtime, supplier_id, body.observations),
    )
    content_hash = hashlib.sha256(
        json.dumps(body.observations, sort_keys=True, default=str).encode()
    ).hexdigest()
    delivery_id = body.delivery_id or f"sha256:{content_hash[:32]}"
    # A supplier's delivery ids are one namespace, whichever way its deliveries come.
    with runtime.store.connection() as conn:
        source = inbox.held_by(conn, supplier_id, delivery_id)
    if source is not None:
        raise ApiError(
            409,
            "delivery_id_conflict",
            f"delivery {delivery_id!r} was already received with other content"
            f" (a feed delivery, by {source}): choose another id",
        )
    command = ReportStock(
        at=at,
        cause=cause_for(key, "supplier.stock.reported", request_id),
        supplier_id=supplier_id,
        delivery_id=delivery_id,
        content_hash=content_hash,
        source="api",
        rows=len(body.observations),
        observations=observations,
        rejected=rejected,
        ceiling=FeedRules.of(supplier.terms).max_quantity,
    )
    outcome = runtime.writer.execute(command)
    counted: DeliveryOutcome = outcome.value
    newest = max((o.observed_at for o in observations), default=None)
    # A supplier that pushes its stock shows in feed health as one whose feeds are pulled.
    with runtime.store.transaction() as conn:
        # Kept under the report's id and each record's index: a replay adds none again.
        record_dead_letters(
            conn,
            supplier_id,
            counted.delivery_id,
            as_dead_letters(counted, body.observations, at, FeedRules.of(supplier.terms)),
        )
        health.succeeded(
            conn,
            supplier_id,
            counted.delivery_id,
            counted.rows,
            counted.applied,
            len(counted.rejected),
            None if newest is None else max(0.0, (at - newest).total_seconds()),
            late=counted.late,
        )
    set_position(response, outcome.position)
    return report_out(counted, outcome.position)


SKU_FOR_ADMINS = "sku_not_allowed: a SKU this supplier maps none of its SKUs to"
# How long a report naming our SKUs waits for the mappings view, where it lacks some.
MAPPING_WAIT_SECONDS = 2.0


def _mapped(runtime: Runtime, supplier_id: str, records: list[dict[str, Any]]) -> set[str]:
    """The SKUs of ours that these records name and the supplier maps one of its own to."""
    named = [r["sku"] for r in records if isinstance(r, dict) and isinstance(r.get("sku"), str)]
    if not named:
        return set()

    def found() -> set[str]:
        with runtime.store.connection() as conn:
            rows = conn.execute(
                "SELECT DISTINCT sku FROM view_mappings WHERE supplier_id = %s AND sku = ANY(%s)",
                (supplier_id, named),
            ).fetchall()
        return {row["sku"] for row in rows}

    mapped = found()
    if set(named) - mapped:
        # A mapping made a moment ago may not be in the view yet: wait for it (a little).
        head = runtime.app.recorder.max_notification_id() or 0
        with contextlib.suppress(PositionNotReached):
            runtime.views.wait_for("mappings", head, MAPPING_WAIT_SECONDS)
        mapped = found()
    return mapped


def parse_observations(
    records: list[dict[str, Any]],
    terms: SupplierTerms,
    received_at: datetime,
    *,
    our_skus: set[str] | None = None,
) -> tuple[list[Observation], list[Rejection]]:
    """Validates each record on its own, by the rules its feeds follow: a naive time is in
    the supplier's zone, a report older than its `max_age_seconds` (where set: unlike a
    feed, the API records an older one, and it shows excluded) is refused, a named unit
    is the mapping's own, one of its unit table or a base unit (else the ledger refuses
    it), a quantity past its `max_quantity` is refused. With `our_skus` (a supplier's own
    key: the SKUs of ours it maps one of its own to), a record naming another `sku` of
    ours is refused."""
    rules = FeedRules.of(terms)
    if "max_age_seconds" not in (terms.connector or {}):
        rules = replace(rules, max_age=None)
    observations: list[Observation] = []
    rejected: list[Rejection] = []
    for index, record in enumerate(records):
        try:
            parsed = ObservationIn.model_validate(record)
        except ValidationError as error:
            reason = "invalid_record: " + "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}"
                for e in error.errors()
            )
            rejected.append(Rejection(index, reason, kept(record)))
            continue
        if parsed.sku is not None and our_skus is not None and parsed.sku not in our_skus:
            # A supplier's key names only SKUs of ours that it supplies (maps one of its own
            # to): it set a level for any SKU of the catalogue (found by a security review),
            # and learnt which exist from `unknown_sku`.
            rejected.append(Rejection(index, SKU_FOR_ADMINS, kept(record)))
            continue
        observed_at = observed_utc(parsed.observed_at, rules, received_at, received_at)
        if isinstance(observed_at, str):
            rejected.append(Rejection(index, observed_at, kept(record)))
            continue
        factor = unit_factor(parsed.unit, rules)  # None: the mapping decides, or refuses
        expected = [e.quantity for e in parsed.incoming or ()]
        # In base units, the ledger checks it by the unit its mapping says.
        if max([parsed.quantity, *expected]) > rules.max_quantity:
            rejected.append(Rejection(index, "quantity_out_of_range", kept(record)))
            continue
        observations.append(
            Observation(
                index=index,
                supplier_sku=parsed.supplier_sku,
                sku=parsed.sku,
                quantity=parsed.quantity,
                unit=parsed.unit,
                factor=factor,
                observed_at=observed_at,
                incoming=None
                if parsed.incoming is None
                else tuple(
                    (None if e.expected_on is None else e.expected_on.isoformat(), e.quantity)
                    for e in parsed.incoming
                ),
            )
        )
    return observations, rejected


def as_dead_letters(
    outcome: DeliveryOutcome,
    records: list[dict[str, Any]],
    received_at: datetime,
    rules: FeedRules,
) -> Rejections:
    """A report's refused records as dead letters keep them: each as sent, with what a
    retry applies of it (as a feed's record, named by the supplier's SKU; a record that
    cannot be read, or names our SKU, which no feed record can, is kept but not retried).
    A naive time is kept as the moment it was read as when received (in the supplier's
    zone then), as a feed's letter keeps it: kept naive, a retry read it in the zone of
    the day of the retry, 14 hours off after the zone was corrected (a walkthrough)."""
    refused = Rejections()
    for rejection in outcome.rejected:
        sent = records[rejection.index]
        fields = as_feed_record(rejection.index, sent, rules, received_at)
        refused.append(
            Rejection(
                rejection.index,
                # A reason names the fields it found wrong; PostgreSQL refuses a NUL in text.
                rejection.reason.replace("\x00", "\ufffd"),
                {
                    "fields": None if fields is None else record_fields(fields, received_at),
                    "raw": sent,
                },
            )
        )
    return refused


def as_feed_record(
    index: int, sent: dict[str, Any], rules: FeedRules, received_at: datetime
) -> Record | None:
    """A reported record as a feed's record of the supplier's SKU, if it is one, its
    time in UTC where it can be read so (else as sent: it is refused again)."""
    try:
        parsed = ObservationIn.model_validate(sent)
    except ValidationError:
        return None
    if parsed.supplier_sku is None:
        return None
    observed_at = parsed.observed_at
    if observed_at is not None and observed_at.tzinfo is None:
        observed_at = rules.in_utc(observed_at, received_at) or observed_at
    return Record(
        position=index,
        supplier_sku=parsed.supplier_sku,
        upc=None,
        quantity=parsed.quantity,
        unit=parsed.unit,
        observed_at=observed_at,
        raw=sent,
        incoming=None
        if parsed.incoming is None
        else tuple(Incoming(e.quantity, e.expected_on, None) for e in parsed.incoming),
    )


def report_out(outcome: DeliveryOutcome, position: int | None) -> StockReportOut:
    return StockReportOut(
        delivery_id=outcome.delivery_id,
        rows=outcome.rows,
        applied=outcome.applied,
        unchanged=outcome.unchanged,
        late=outcome.late,
        rejected=[RejectedOut(index=r.index, reason=r.reason) for r in outcome.rejected],
        position=position,
    )
