"""Dead letters: refused records kept with their reason, listed, and tried again once fixed."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import sql

from connectors.ingest import Ingestor
from connectors.normalise import record_from_fields
from connectors.outcome import Rejections
from projections.store import Connection, ViewStore


class RetryBusy(Exception):
    """Another retry of this process ran past RETRY_WAIT_SECONDS: none was made (the API
    answers 503, to be tried again)."""


@dataclass
class RetryOutcome:
    resolved: list[int] = field(default_factory=list)
    still_refused: dict[int, str] = field(default_factory=dict)
    not_retryable: list[int] = field(default_factory=list)
    # Open letters another retry holds (in this process or another): left to it.
    being_retried: list[int] = field(default_factory=list)
    position: int | None = None
    # What the resolved records did: changed a level, repeated it, or came too late (a
    # newer report is on record, and stands).
    applied: int = 0
    unchanged: int = 0
    late: int = 0


def listing(
    store: ViewStore,
    *,
    supplier_id: str | None = None,
    reason: str | None = None,
    status: str | None = "open",
    delivery_id: str | None = None,
    after: int = 0,
    limit: int = 100,
    ids_only: bool = False,
) -> list[dict[str, Any]]:
    """Letters by id, filtered; with `ids_only`, only their ids (a bulk retry reads up to
    100,000 letters whole once: not twice)."""
    columns = sql.SQL(
        "id"
        if ids_only
        else "id, supplier_id, delivery_id, position, reason, record, raw, status, attempts,"
        " created_at, updated_at, superseded_by"
    )
    with store.connection() as conn:
        return conn.execute(
            sql.SQL("SELECT {} FROM connector_dead_letters").format(columns)
            + sql.SQL(
                " WHERE id > %(after)s"
                " AND (%(supplier)s::text IS NULL OR supplier_id = %(supplier)s)"
                # A prefix, taken as written: "_" or "%" in it are not patterns.
                " AND (%(reason)s::text IS NULL OR starts_with(reason, %(reason)s))"
                " AND (%(delivery)s::text IS NULL OR delivery_id = %(delivery)s)"
                " AND (%(status)s::text IS NULL OR status = %(status)s)"
                " ORDER BY id LIMIT %(limit)s"
            ),
            {
                "after": after,
                "supplier": supplier_id,
                "reason": reason,
                "status": status,
                "delivery": delivery_id,
                "limit": limit,
            },
        ).fetchall()


# A retry claims the open letters it applies: it locks them for as long as it runs, and
# skips those another retry holds. Two retries at once each applied every letter and
# reported it resolved, and a letter dismissed meanwhile was applied and marked resolved
# over its dismissal (a walkthrough).
CLAIM = """
SELECT id, supplier_id, delivery_id, reason, record, raw FROM connector_dead_letters
WHERE id = ANY(%s) AND status = 'open' ORDER BY id FOR UPDATE SKIP LOCKED
"""
# The other open letters of records that disagreed with those being retried, or may: the
# same delivery's, at the same time (compared as times, not as text), either refused as
# disagreeing and of the same SKU where their letters name the SKU they resolved to
# (`raw.sku`, as the ledger's refusals keep it; a stock report's letter may not), or of the
# same supplier record (supplier SKU and UPC), whatever the reason (`_groups`). Without
# the SKU, retrying one letter tried again every such letter of its delivery, 98 of them
# for 49 other SKUs (a walkthrough); without the supplier record, two records of one SKU
# at one time that were refused as unmapped were retried one at a time once mapped, and
# the first retried was applied (an operator walkthrough).
# Two joins on equalities a hash join can take, by the key of the letter's record
# (supplier SKU and UPC) and by the SKU it resolved to: IS NOT DISTINCT FROM, or an OR of
# the two kinds of partner, made the planner compare every open letter of the delivery
# with every letter retried (a review: 1,000 of a delivery of 200,000 took 79 s).
DISAGREEING = """
WITH asked AS MATERIALIZED (
    SELECT supplier_id, delivery_id, reason, (record ->> 'observed_at')::timestamptz AS at,
           raw ->> 'sku' AS sku, record ->> 'supplier_sku' AS supplier_sku,
           record ->> 'upc' AS upc
    FROM connector_dead_letters
    WHERE id = ANY(%(ids)s) AND status = 'open' AND record IS NOT NULL
), delivered AS (
    SELECT o.id, o.supplier_id, o.delivery_id, o.reason, o.record, o.raw,
           (o.record ->> 'observed_at')::timestamptz AS at
    FROM connector_dead_letters o
    WHERE (o.supplier_id, o.delivery_id) IN (SELECT supplier_id, delivery_id FROM asked)
      AND o.status = 'open' AND NOT o.id = ANY(%(ids)s) AND o.record IS NOT NULL
)
SELECT o.id, o.supplier_id, o.delivery_id, o.reason, o.record, o.raw
FROM delivered o JOIN asked l
  ON o.supplier_id = l.supplier_id AND o.delivery_id = l.delivery_id AND o.at = l.at
 AND coalesce(o.raw ->> 'sku', '') = coalesce(l.sku, '')
 AND (o.raw ->> 'sku' IS NULL) = (l.sku IS NULL)
WHERE l.reason = 'conflicting_duplicate' AND o.reason = 'conflicting_duplicate'
UNION
SELECT o.id, o.supplier_id, o.delivery_id, o.reason, o.record, o.raw
FROM delivered o JOIN asked l
  ON o.supplier_id = l.supplier_id AND o.delivery_id = l.delivery_id AND o.at = l.at
 AND coalesce(o.record ->> 'supplier_sku', '') = coalesce(l.supplier_sku, '')
 AND (o.record ->> 'supplier_sku' IS NULL) = (l.supplier_sku IS NULL)
 AND coalesce(o.record ->> 'upc', '') = coalesce(l.upc, '')
 AND (o.record ->> 'upc' IS NULL) = (l.upc IS NULL)
WHERE coalesce(l.supplier_sku, l.upc) IS NOT NULL
ORDER BY id
"""


def _groups(letter: dict[str, Any]) -> set[tuple[Any, ...]]:
    """The groups a letter is retried with, as DISAGREEING pairs them: letters that share
    one are partners."""
    record = letter.get("record")
    if not isinstance(record, dict):
        return set()
    try:
        at = datetime.fromisoformat(record["observed_at"])
    except (KeyError, TypeError, ValueError):
        return set()
    of = (letter["supplier_id"], letter["delivery_id"], at)
    groups: set[tuple[Any, ...]] = set()
    raw = letter.get("raw")
    if letter["reason"] == "conflicting_duplicate":
        groups.add(("disagreed", *of, raw.get("sku") if isinstance(raw, dict) else None))
    if record.get("supplier_sku") is not None or record.get("upc") is not None:
        groups.add(("record", *of, record.get("supplier_sku"), record.get("upc")))
    return groups


# Those partners claimed too, those another retry does not hold.
CLAIM_PARTNERS = """
SELECT id FROM connector_dead_letters
WHERE id = ANY(%s) AND status = 'open' ORDER BY id FOR UPDATE SKIP LOCKED
"""
# The letters asked for that are open but were not claimed: another retry holds them.
STILL_OPEN = "SELECT id FROM connector_dead_letters WHERE id = ANY(%s) AND status = 'open'"
# A retry holds a connection for its claims while the ledger applies its letters on
# others: one retry at a time in a process, so that retries never take the pool. One
# that waits this long for another gives up (RetryBusy): waiting without end held a
# request's thread for as long as a bulk retry ran (a review).
_retrying = threading.Lock()
RETRY_WAIT_SECONDS = 5.0


def superseded_by(store: ViewStore, letter_id: int) -> int | None:
    """The letter that superseded this one, if it is superseded."""
    with store.connection() as conn:
        row = conn.execute(
            "SELECT superseded_by FROM connector_dead_letters"
            " WHERE id = %s AND status = 'superseded'",
            (letter_id,),
        ).fetchone()
    return None if row is None else int(row["superseded_by"])


def letter_suppliers(store: ViewStore, delivery_id: str) -> list[str]:
    """The suppliers with open letters of a delivery of this id."""
    with store.connection() as conn:
        rows = conn.execute(
            "SELECT DISTINCT supplier_id FROM connector_dead_letters"
            " WHERE delivery_id = %s AND status = 'open' ORDER BY supplier_id",
            (delivery_id,),
        ).fetchall()
    return [row["supplier_id"] for row in rows]


def retry(store: ViewStore, ingestor: Ingestor, letter_ids: list[int], actor: str) -> RetryOutcome:
    """Applies open letters again, supplier by supplier; the ones that now apply (or are
    now unchanged) are resolved, the others stay open with their new reason.

    Records of one SKU at one time that disagree were all refused (`conflicting_duplicate`):
    such a letter is always tried again with the other open ones of its delivery at that
    time, so that they disagree again, however the letters were picked (one, or a bulk
    retry's first `limit`): one applies alone only once the operator has dismissed the
    others (`dismiss`), never to come back with a later retry.

    The letters are claimed (CLAIM) for the whole retry, in a transaction that marks them
    at its end: a letter another retry holds is left to it (`being_retried`), and one
    being retried cannot be dismissed until the retry ends. Where applying one supplier's
    letters fails, the letters applied before it are marked, and the error raised."""
    if not _retrying.acquire(timeout=RETRY_WAIT_SECONDS):
        raise RetryBusy("another dead-letter retry is running in this process")
    try:
        with store.transaction() as claim:
            outcome, failure = _retry(claim, ingestor, letter_ids, actor)
    finally:
        _retrying.release()
    if failure is not None:
        raise failure
    return outcome


def _retry(
    claim: Connection, ingestor: Ingestor, letter_ids: list[int], actor: str
) -> tuple[RetryOutcome, Exception | None]:
    outcome = RetryOutcome()
    letters = claim.execute(CLAIM, (letter_ids,)).fetchall()
    claimed = [letter["id"] for letter in letters]
    if set(claimed) != set(letter_ids):
        left = claim.execute(STILL_OPEN, ([i for i in letter_ids if i not in claimed],))
        outcome.being_retried = sorted(row["id"] for row in left)
    partners = claim.execute(DISAGREEING, {"ids": claimed}).fetchall()
    if partners:
        held = claim.execute(CLAIM_PARTNERS, ([p["id"] for p in partners],)).fetchall()
        letters, partners = _together(letters, partners, {row["id"] for row in held}, outcome)
        letters += partners
    by_supplier: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for letter in letters:
        if letter["record"] is None:
            outcome.not_retryable.append(letter["id"])
        else:
            by_supplier[letter["supplier_id"]].append(letter)
    for supplier_id, group in by_supplier.items():
        records = [record_from_fields(g["id"], g["record"], g["raw"]) for g in group]
        try:
            result = ingestor.retry(supplier_id, records, actor)
        except Exception as error:  # the letters applied before it are marked all the same
            return outcome, error
        refused: dict[int, str] = {}
        # The SKU a record refused as disagreeing now resolves to, kept in its letter's
        # `raw` as a delivery's own such letters keep it: a letter first refused for
        # another reason (unmapped) had none, and its retry took along every disagreeing
        # letter of its delivery, 20,000 for one (a walkthrough).
        resolved_to: dict[int, str] = {}
        for rejection in result.rejections:
            refused[rejection.index] = rejection.reason
            raw = (rejection.record or {}).get("raw")
            sku = raw.get("sku") if isinstance(raw, dict) else None
            if rejection.reason == "conflicting_duplicate" and isinstance(sku, str):
                resolved_to[rejection.index] = sku
        outcome.applied += result.applied
        outcome.unchanged += result.unchanged
        outcome.late += result.late
        if result.position is not None:
            outcome.position = max(outcome.position or 0, result.position)
        ids = sorted(letter["id"] for letter in group)
        still = {i: refused[i] for i in ids if i in refused}
        outcome.still_refused.update(still)
        resolved = [i for i in ids if i not in refused]
        outcome.resolved += resolved
        # Claimed, so locked already. Two statements, not one a letter: 100,000 letters
        # took 21 s so.
        claim.execute(
            "UPDATE connector_dead_letters l SET attempts = attempts + 1,"
            " reason = s.reason, updated_at = now(),"
            " raw = CASE WHEN s.sku IS NULL OR jsonb_typeof(l.raw) <> 'object' THEN l.raw"
            "  ELSE l.raw || jsonb_build_object('sku', s.sku) END"
            " FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS s(id, reason, sku)"
            " WHERE l.id = s.id",
            (list(still), list(still.values()), [resolved_to.get(i) for i in still]),
        )
        claim.execute(
            "UPDATE connector_dead_letters SET attempts = attempts + 1,"
            " status = 'resolved', updated_at = now() WHERE id = ANY(%s)",
            (resolved,),
        )
    return outcome, None


def _together(
    letters: list[dict[str, Any]],
    partners: list[dict[str, Any]],
    held: set[int],
    outcome: RetryOutcome,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The claimed letters and their partners to retry together, every one claimed: where
    another retry holds a partner, the letters it is a partner of are left out of this one
    (`being_retried`), and theirs in turn: two retries at once each applied one of a pair
    alone, and the tie made an arbitrary one the level (a review)."""
    busy = [p for p in partners if p["id"] not in held]
    if not busy:
        return letters, partners
    waiting = set().union(*(_groups(p) for p in busy))
    rest = {x["id"]: _groups(x) for x in letters}
    rest.update((p["id"], _groups(p)) for p in partners if p["id"] in held)
    waits_ids: set[int] = set()
    grew = True
    while grew:  # partners of partners wait too
        more = {i for i, groups in rest.items() if i not in waits_ids and groups & waiting}
        for i in more:
            waiting |= rest[i]
        waits_ids |= more
        grew = bool(more)

    def waits(letter: dict[str, Any]) -> bool:
        return letter["id"] in waits_ids

    left_out = [letter["id"] for letter in letters if waits(letter)]
    outcome.being_retried = sorted({*outcome.being_retried, *left_out})
    kept = [letter for letter in letters if not waits(letter)]
    return kept, [p for p in partners if p["id"] in held and not waits(p)]


@dataclass
class Dismissal:
    dismissed: list[int] = field(default_factory=list)
    # Open letters a retry holds: not dismissed (the retry may be applying them).
    being_retried: list[int] = field(default_factory=list)
    # Letters the dismissed ones had superseded, open again.
    reopened: list[int] = field(default_factory=list)


def dismiss(store: ViewStore, letter_ids: list[int]) -> Dismissal:
    """Closes open letters without applying them (the false one of records that
    disagreed, say), except those a retry holds; the letters they superseded are open
    again (`reopened`): the newest report left of each record is the one to retry."""
    with store.transaction() as conn:
        # In turn with the suppliers' deliveries recording letters: one could close a
        # letter by this one, unseen by the reopening below, and leave it closed by a
        # dismissed letter for good (a review).
        suppliers = conn.execute(
            "SELECT DISTINCT supplier_id FROM connector_dead_letters WHERE id = ANY(%s)"
            " ORDER BY supplier_id",
            (letter_ids,),
        ).fetchall()
        for row in suppliers:
            conn.execute(LETTERS_OF_SUPPLIER, (row["supplier_id"],))
        rows = conn.execute(
            "UPDATE connector_dead_letters SET status = 'dismissed', updated_at = now()"
            " WHERE id IN (SELECT id FROM connector_dead_letters"
            "  WHERE id = ANY(%s) AND status = 'open' ORDER BY id FOR UPDATE SKIP LOCKED)"
            " RETURNING id",
            (letter_ids,),
        ).fetchall()
        dismissed = sorted(row["id"] for row in rows)
        reopened = conn.execute(
            "UPDATE connector_dead_letters SET status = 'open', superseded_by = NULL,"
            " updated_at = now() WHERE superseded_by = ANY(%s) AND status = 'superseded'"
            " RETURNING id",
            (dismissed,),
        ).fetchall()
        left = [i for i in letter_ids if i not in set(dismissed)]
        busy = conn.execute(STILL_OPEN, (left,)).fetchall() if left else []
    return Dismissal(
        dismissed, sorted(row["id"] for row in busy), sorted(row["id"] for row in reopened)
    )


def letter_json(value: Any) -> str:
    """A letter's record as JSON that PostgreSQL takes: a number JSON cannot hold (a
    supplier's `NaN`, or `1e400` read as infinite) as its name in a string, and a NUL as
    U+FFFD (PostgreSQL's JSON holds no `\\u0000`). Written as Python writes them,
    PostgreSQL refused the whole letter's batch, and with it the delivery, retried for good
    ahead of every other (a fuzzing walkthrough; a review, for the NUL)."""
    try:
        written = json.dumps(value, allow_nan=False, default=str)
    except ValueError:
        written = None
    if written is None or "\\u0000" in written:
        written = json.dumps(_storable(value), default=str)
    return written


def _storable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(item) for item in value]
    return value


# A record's time as our letters write it (Python's `isoformat`), guarded so that a time
# kept otherwise is never cast (a failed cast would fail the delivery).
_TIME = r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d{1,6})?([+-]\d\d:\d\d)?$"


def _fixable(letter: str) -> sql.Composed:
    """SQL: the letter was refused for what we have not set up yet (a mapping, a unit, a
    SKU), not for what its record says: a retry applies it once that is done."""
    reason = sql.SQL("{}.reason").format(sql.Identifier(letter))
    return sql.SQL(
        "(starts_with({r}, 'unmapped_') OR starts_with({r}, 'unknown_unit')"
        " OR {r} IN ('made_before_units_changed', 'unknown_sku'))"
    ).format(r=reason)


def _wrong(letter: str) -> sql.Composed:
    """SQL: the letter was refused for what its record says and no setting changes (a
    negative or missing quantity, say): not fixable, and not for its time (a clock ahead)
    or a quantity over the supplier's ceiling (which its settings may raise)."""
    reason = sql.SQL("{}.reason").format(sql.Identifier(letter))
    return sql.SQL(
        "(NOT {fixable} AND {r} NOT IN"
        " ('observed_at_in_future', 'observed_at_out_of_range', 'quantity_out_of_range'))"
    ).format(fixable=_fixable(letter), r=reason)


def _observed(letter: str) -> sql.Composed:
    at = sql.SQL("{}.record ->> 'observed_at'").format(sql.Identifier(letter))
    return sql.SQL("CASE WHEN {at} ~ {pattern} THEN ({at})::timestamptz END").format(
        at=at, pattern=sql.Literal(_TIME)
    )


# A delivery's open letters of records refused for what we have not set up yet (an
# unmapped supplier SKU or UPC, an unknown unit or SKU, a mapping's units changed since:
# fixable) close the open letters of earlier deliveries of the same supplier record (the
# same supplier SKU and UPC) that they are no older than, whatever those were refused for;
# those refused for what their record says and no setting changes (`_wrong`) close only
# letters refused so too; those refused for their time close nothing: each such
# letter is then `superseded`, naming the newer one (`superseded_by`), which is the one to
# retry once set up (an older report would be `late` beside it). Kept, not deleted: listed
# with `status=superseded`. A feed read again and again with a record nobody mapped (a
# poll that sends no validators) made a letter of it at every poll: 464 open letters from
# 95 polls of one list (a walkthrough), each one a report older than the next. A letter of
# a record that is itself wrong (a time in the future or out of range, a negative or
# missing quantity) closes no fixable one: a supplier clock hours ahead, or a year 2099,
# closed a good letter that no retry could then apply (an operator walkthrough; a review,
# for the quantities). A letter whose record could not be read, or names no supplier SKU or UPC,
# closes nothing and is closed by nothing; nor is a `conflicting_duplicate` one closed (its
# partners would be retried without it); one that a retry holds is left to it (SKIP
# LOCKED); one dismissed or resolved closes nothing (a delivery sent again made its
# dismissed letter close again the one its dismissal had opened: a review). Dismissing a
# letter opens again those it closed (`dismiss`). Deliveries of one supplier record their
# letters one at a time (LETTERS_OF_SUPPLIER): two at once did not see each other's, and
# both stayed open (an operator walkthrough).
SUPERSEDE = sql.SQL("""
WITH newest AS (
    SELECT DISTINCT ON (n.record ->> 'supplier_sku', n.record ->> 'upc')
           n.id, n.record ->> 'supplier_sku' AS supplier_sku, n.record ->> 'upc' AS upc,
           {n_at} AS observed_at, {n_fixable} AS fixable, {n_wrong} AS wrong
    FROM connector_dead_letters n
    WHERE n.supplier_id = %(supplier)s AND n.delivery_id = %(delivery)s
      AND n.status = 'open' AND n.record IS NOT NULL
      AND coalesce(n.record ->> 'supplier_sku', n.record ->> 'upc') IS NOT NULL
    ORDER BY n.record ->> 'supplier_sku', n.record ->> 'upc', 4 DESC NULLS LAST, n.id DESC
), closed AS (
    SELECT o.id, n.id AS by
    FROM connector_dead_letters o
    -- Equalities a hash join can take (IS NOT DISTINCT FROM cannot: 100,000 open
    -- letters against 100,000 new ran for minutes, a nested loop).
    JOIN newest n ON coalesce(o.record ->> 'supplier_sku', '') = coalesce(n.supplier_sku, '')
                 AND (o.record ->> 'supplier_sku' IS NULL) = (n.supplier_sku IS NULL)
                 AND coalesce(o.record ->> 'upc', '') = coalesce(n.upc, '')
                 AND (o.record ->> 'upc' IS NULL) = (n.upc IS NULL)
    WHERE o.supplier_id = %(supplier)s AND o.status = 'open'
      AND o.delivery_id <> %(delivery)s AND o.record IS NOT NULL
      AND o.reason <> 'conflicting_duplicate' AND (n.fixable OR (n.wrong AND {o_wrong}))
      AND ({o_at} <= n.observed_at) IS NOT FALSE
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE connector_dead_letters l SET status = 'superseded', superseded_by = c.by,
       updated_at = now()
FROM closed c
-- The supplier's open letters only (its index), not the whole table's, on a hash join.
WHERE l.id = c.id AND l.supplier_id = %(supplier)s AND l.status = 'open'
""").format(
    n_at=_observed("n"),
    o_at=_observed("o"),
    n_fixable=_fixable("n"),
    n_wrong=_wrong("n"),
    o_wrong=_wrong("o"),
)


# And the other way: a delivery's letter of a report older than an open letter of another
# delivery that would close it were they the other way round (that one fixable, or both
# refused for what their records say) is closed by it at once, `superseded_by` naming it.
# A late report of a record left a second open letter beside the newer one (a walkthrough),
# whose retry could only be `late`.
SUPERSEDED_ON_ARRIVAL = sql.SQL("""
WITH fresh AS (
    SELECT n.id, n.record ->> 'supplier_sku' AS supplier_sku, n.record ->> 'upc' AS upc,
           {n_at} AS observed_at, {n_wrong} AS wrong
    FROM connector_dead_letters n
    WHERE n.supplier_id = %(supplier)s AND n.delivery_id = %(delivery)s
      AND n.status = 'open' AND n.record IS NOT NULL AND n.reason <> 'conflicting_duplicate'
      AND coalesce(n.record ->> 'supplier_sku', n.record ->> 'upc') IS NOT NULL
), closed AS (
    SELECT DISTINCT ON (f.id) f.id, o.id AS by
    FROM fresh f
    JOIN connector_dead_letters o
      ON coalesce(o.record ->> 'supplier_sku', '') = coalesce(f.supplier_sku, '')
     AND (o.record ->> 'supplier_sku' IS NULL) = (f.supplier_sku IS NULL)
     AND coalesce(o.record ->> 'upc', '') = coalesce(f.upc, '')
     AND (o.record ->> 'upc' IS NULL) = (f.upc IS NULL)
    WHERE o.supplier_id = %(supplier)s AND o.status = 'open'
      AND o.delivery_id <> %(delivery)s AND o.record IS NOT NULL
      AND ({o_fixable} OR ({o_wrong} AND f.wrong))
      AND {o_at} > f.observed_at
    ORDER BY f.id, {o_at} DESC, o.id DESC
)
UPDATE connector_dead_letters l SET status = 'superseded', superseded_by = c.by,
       updated_at = now()
FROM closed c
WHERE l.id = c.id AND l.supplier_id = %(supplier)s AND l.delivery_id = %(delivery)s
  AND l.status = 'open'
""").format(
    n_at=_observed("n"),
    n_wrong=_wrong("n"),
    o_at=_observed("o"),
    o_fixable=_fixable("o"),
    o_wrong=_wrong("o"),
)


LETTERS_OF_SUPPLIER = (
    "SELECT pg_advisory_xact_lock(hashtextextended('connector_dead_letters:' || %s, 0))"
)


def record_delivery_letters(
    conn: Connection, inbox_id: int, supplier_id: str, delivery_id: str, rejections: Rejections
) -> float | None:
    """A delivery's letters, recorded after its outcome in the same transaction; where
    there were any, the time they took is added to the outcome's `seconds` (`letters`),
    and the delivery's `finished_at` moved to when they were done: both said when its
    outcome was written, and a delivery whose letters took minutes showed as finished in
    under a second (an operator walkthrough). Returns the seconds, None without letters."""
    if not rejections:
        return None
    began = time.monotonic()
    record_dead_letters(conn, supplier_id, delivery_id, rejections)
    took = round(time.monotonic() - began, 3)
    conn.execute(
        "UPDATE connector_inbox SET finished_at = clock_timestamp(),"
        " outcome = jsonb_set(outcome, '{seconds,letters}', to_jsonb(%s::double precision))"
        " WHERE id = %s AND outcome ? 'seconds'",
        (took, inbox_id),
    )
    return took


def record_dead_letters(
    conn: Connection, supplier_id: str, delivery_id: str, rejections: Rejections
) -> None:
    """Stores every refused record with its reason, once per delivery and position, in
    the caller's transaction: by COPY, as they are read from the delivery's spool (which
    kept each record as a letter keeps it, see connectors.outcome), into a table of the
    transaction's, and from there in one statement. 1,000,000 letters took 27 s one
    statement each (`executemany`). The open letters of earlier deliveries that these
    supersede are closed (SUPERSEDE)."""
    if not rejections:
        return
    conn.execute(LETTERS_OF_SUPPLIER, (supplier_id,))
    conn.execute(
        "CREATE TEMPORARY TABLE letters_in (position integer, reason text, record jsonb,"
        " raw jsonb) ON COMMIT DROP"
    )
    with conn.cursor() as cursor, cursor.copy("COPY letters_in FROM STDIN") as copy:
        for rejection in rejections:
            record = rejection.record or {}
            fields, raw = record.get("fields"), record.get("raw", record)
            written = None if fields is None else letter_json(fields)
            # Most letters keep the record as written as their raw record too: once.
            raw_written = written if raw is fields else letter_json(raw)
            copy.write_row((rejection.index, rejection.reason, written, raw_written))
    conn.execute(
        "INSERT INTO connector_dead_letters"
        " (supplier_id, delivery_id, position, reason, record, raw)"
        " SELECT %s, %s, position, reason, record, raw FROM letters_in ORDER BY position"
        " ON CONFLICT (supplier_id, delivery_id, position) DO NOTHING",
        (supplier_id, delivery_id),
    )
    conn.execute("DROP TABLE letters_in")
    # Hash joins, whatever the planner estimates: the letters just written are in no
    # statistics, and estimated at a row or so it chose nested loops that scanned every
    # open letter of the supplier for each new one (an operator walkthrough: 40,000 new
    # letters took 11 minutes, and every connector worker waited on the supplier's lock).
    conn.execute("SET LOCAL enable_nestloop = off")
    conn.execute(SUPERSEDE, {"supplier": supplier_id, "delivery": delivery_id})
    conn.execute(SUPERSEDED_ON_ARRIVAL, {"supplier": supplier_id, "delivery": delivery_id})
    conn.execute("SET LOCAL enable_nestloop = on")
