"""Dead letters: refused records kept with their reason, listed, and tried again once fixed."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from connectors.ingest import Ingestor
from connectors.normalise import record_from_fields
from ledger.commands import Observation
from ledger.delivery import Rejection, kept
from ledger.stock import incoming_of
from projections.store import Connection, ViewStore


@dataclass
class RetryOutcome:
    resolved: list[int] = field(default_factory=list)
    still_refused: dict[int, str] = field(default_factory=dict)
    not_retryable: list[int] = field(default_factory=list)
    position: int | None = None


def listing(
    store: ViewStore,
    *,
    supplier_id: str | None = None,
    reason: str | None = None,
    status: str | None = "open",
    after: int = 0,
    limit: int = 100,
) -> list[dict[str, Any]]:
    with store.connection() as conn:
        return conn.execute(
            "SELECT id, supplier_id, delivery_id, position, reason, record, raw, status,"
            " attempts, created_at, updated_at FROM connector_dead_letters"
            " WHERE id > %(after)s"
            " AND (%(supplier)s::text IS NULL OR supplier_id = %(supplier)s)"
            # A prefix, taken as written: "_" or "%" in it are not patterns.
            " AND (%(reason)s::text IS NULL OR starts_with(reason, %(reason)s))"
            " AND (%(status)s::text IS NULL OR status = %(status)s)"
            " ORDER BY id LIMIT %(limit)s",
            {
                "after": after,
                "supplier": supplier_id,
                "reason": reason,
                "status": status,
                "limit": limit,
            },
        ).fetchall()


def retry(store: ViewStore, ingestor: Ingestor, letter_ids: list[int], actor: str) -> RetryOutcome:
    """Applies open letters again, supplier by supplier; the ones that now apply (or are
    now unchanged) are resolved, the others stay open with their new reason."""
    outcome = RetryOutcome()
    with store.connection() as conn:
        letters = conn.execute(
            "SELECT id, supplier_id, record, raw FROM connector_dead_letters"
            " WHERE id = ANY(%s) AND status = 'open' ORDER BY id",
            (letter_ids,),
        ).fetchall()
    by_supplier: dict[str, list[dict[str, Any]]] = defaultdict(list)
    resolved_by_supplier: dict[str, list[Observation]] = defaultdict(list)
    for letter in letters:
        observation = _refused_by_the_ledger(letter)
        if observation is not None:
            resolved_by_supplier[letter["supplier_id"]].append(observation)
            by_supplier[letter["supplier_id"]].append(letter)
        elif letter["record"] is None or "observation" in letter["record"]:
            outcome.not_retryable.append(letter["id"])
        else:
            by_supplier[letter["supplier_id"]].append(letter)
    for supplier_id, group in by_supplier.items():
        resolved = resolved_by_supplier.get(supplier_id, [])
        records = [
            record_from_fields(g["id"], g["record"], g["raw"])
            for g in group
            if "observation" not in g["record"]
        ]
        results = [ingestor.retry(supplier_id, records, actor)] if records else []
        if resolved:
            results.append(ingestor.retry_resolved(supplier_id, resolved, actor))
        refused = {r.index: r.reason for result in results for r in result.rejections}
        for result in results:
            if result.position is not None:
                outcome.position = max(outcome.position or 0, result.position)
        with store.transaction() as conn:
            for letter in group:
                if letter["id"] in refused:
                    outcome.still_refused[letter["id"]] = refused[letter["id"]]
                    conn.execute(
                        "UPDATE connector_dead_letters SET attempts = attempts + 1, reason = %s,"
                        " updated_at = now() WHERE id = %s",
                        (refused[letter["id"]], letter["id"]),
                    )
                else:
                    outcome.resolved.append(letter["id"])
                    conn.execute(
                        "UPDATE connector_dead_letters SET attempts = attempts + 1,"
                        " status = 'resolved', updated_at = now() WHERE id = %s",
                        (letter["id"],),
                    )
    return outcome


def _refused_by_the_ledger(letter: dict[str, Any]) -> Observation | None:
    """The observation a letter the ledger itself refused was sent (resolved to a SKU, in
    base units; see `record_dead_letters`), to send it again; None for any other letter,
    and for one written before such letters kept it."""
    record = letter["record"]
    if not isinstance(record, dict) or set(record) != {"observation"}:
        return None
    raw = record["observation"]
    if not isinstance(raw, dict):
        return None
    sku, quantity, observed_at = raw.get("sku"), raw.get("quantity"), raw.get("observed_at")
    if not (isinstance(sku, str) and type(quantity) is int and isinstance(observed_at, str)):
        return None
    incoming = raw.get("incoming")
    if incoming is not None and not (
        isinstance(incoming, list)
        and all(
            isinstance(pair, list)
            and len(pair) == 2
            and (pair[0] is None or isinstance(pair[0], str))
            and type(pair[1]) is int
            for pair in incoming
        )
    ):
        return None
    try:
        observed = datetime.fromisoformat(observed_at)
    except ValueError:
        return None
    if observed.tzinfo is None:
        return None
    return Observation(
        index=letter["id"],
        sku=sku,
        quantity=quantity,
        observed_at=observed,
        incoming=None if incoming is None else incoming_of(incoming),
    )


def record_dead_letters(
    conn: Connection, supplier_id: str, delivery_id: str, rejections: list[Rejection]
) -> None:
    """Stores every refused record with its reason, once per delivery and position.

    A record the connectors refused comes as its `fields` (None where it could not be
    read) and `raw` form; one the ledger refused (two records of a SKU at one time that
    disagree, a SKU unknown) as the observation it was sent, resolved to a SKU in base
    units, which is kept as `{"observation": ...}` to be sent again as it is."""
    if not rejections:
        return
    rows = []
    for rejection in rejections:
        record = rejection.record or {}
        if "fields" in record or "raw" in record:
            fields, raw = record.get("fields"), record.get("raw", record)
        else:
            fields, raw = {"observation": record}, record
        rows.append(
            (
                supplier_id,
                delivery_id,
                rejection.index,
                rejection.reason,
                None if fields is None else Jsonb(kept(fields)),
                Jsonb(kept(raw)),
            )
        )
    with conn.cursor() as cursor:
        cursor.executemany(
            sql.SQL(
                "INSERT INTO connector_dead_letters"
                " (supplier_id, delivery_id, position, reason, record, raw)"
                " VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (supplier_id, delivery_id, position) DO NOTHING"
            ),
            rows,
        )
