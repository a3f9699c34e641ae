"""Feed ingest: a large CSV for one supplier, then the same with 5% of quantities changed.

The ledger reads each file through its connector pipeline (parse, normalise, diff against
the current levels, apply the changes through the writer). The baseline, in the same
run, is what a ledger-less service would do: COPY the file into a staging table and
upsert the changed rows with one SQL statement.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from api.logs import configure_logging
from api.runtime import Runtime, open_runtime, tune_collector
from api.settings import Settings
from bench.harness import CpuMeter, fresh_database, projecting
from connectors.outcome import describe_phases
from connectors.simulator import Catalogue, write_csv
from ledger.base import Cause
from ledger.mapping import MappingSpec, SkuMapping
from ledger.stock import StockItem
from ledger.supplier import Supplier, SupplierTerms
from projections.registry import all_projections

DEFAULT_ROWS = 1_000_000
CHANGED = 0.05
SUPPLIER = "bulk"
CAUSE = Cause("bench", "bench.setup", "bench")


def rows_setting() -> int:
    return int(os.environ.get("BENCH_INGEST_ROWS", DEFAULT_ROWS))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Bulk:
    """The ledger applying deliveries in this process, and its processes' ids by part (for
    `CpuMeter`): this one's and the projections worker's."""

    runtime: Runtime
    processes: dict[str, int]


@contextmanager
def bulk_ledger(database_url: str) -> Iterator[Bulk]:
    """The ledger as deployed for bulk feeds: the connector pipeline in this process, the
    projections in a worker process of their own (`ledger projections run`), as the
    reservations benchmark runs them; both on the same two cores."""
    settings = Settings(database_url=database_url, log_level="WARNING")
    configure_logging(settings)
    runtime = open_runtime(settings, sweep=False, connect=False, project=False)
    tune_collector()  # as every ledger process that applies deliveries does
    env = {
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_LOG_LEVEL": "WARNING",
        "LEDGER_LOG_FORMAT": "json",
    }
    try:
        with projecting(env) as projections:
            yield Bulk(runtime, {"ledger": os.getpid(), "projections": projections})
    finally:
        runtime.close()


def setup(runtime: Runtime, catalogue: Catalogue, at: datetime) -> float:
    """The supplier, and one mapping (and SKU) per catalogue item, saved in large batches."""
    started = time.perf_counter()
    terms = SupplierTerms(SUPPLIER, connector={"units": {"CS": 12}})
    runtime.app.save(Supplier.register(SUPPLIER, terms, at, CAUSE))
    batch: list[Any] = []
    for item in catalogue.items():
        spec = MappingSpec(item.supplier_sku, f"B-{item.supplier_sku}", 1, item.upc)
        batch.append(SkuMapping.map(SUPPLIER, spec, at, CAUSE))
        batch.append(StockItem.register(spec.sku, at, CAUSE))
        if len(batch) >= 10_000:
            runtime.app.save(*batch)
            batch = []
    if batch:
        runtime.app.save(*batch)
    head = runtime.app.recorder.max_notification_id() or 0
    runtime.views.wait_for("mappings", head, timeout=3600)
    return time.perf_counter() - started


def quiet(runtime: Runtime, database_url: str) -> None:
    """Both sides of a version start on a quiet database: the projections have applied
    everything before (the first delivery leaves a million events to them) and the
    tables are vacuumed and analysed."""
    head = runtime.app.recorder.max_notification_id() or 0
    for projection in all_projections(runtime.app):
        runtime.views.wait_for(projection.name, head, timeout=3600)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        conn.execute("CHECKPOINT")


def ledger_ingest(bulk: Bulk, database_url: str, body: bytes, version: int) -> dict[str, Any]:
    runtime = bulk.runtime
    before = runtime.app.recorder.max_notification_id() or 0
    wal_at = _wal_position(database_url)
    started = time.perf_counter()
    with CpuMeter(bulk.processes) as cpu:
        result = runtime.ingestor.ingest(
            SUPPLIER,
            f"bench-v{version}",
            io.BytesIO(body),
            "csv",
            source="bench",
            received_at=datetime.now(UTC),
            actor="bench",
        )
    seconds = time.perf_counter() - started
    wal_bytes = _wal_position(database_url) - wal_at
    after = runtime.app.recorder.max_notification_id() or 0
    # When the storefront's views show the whole delivery: the projections run beside the
    # ledger and follow it, so they finish after it.
    for projection in all_projections(runtime.app):
        runtime.views.wait_for(projection.name, after, timeout=3600)
    views_seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "views_seconds": views_seconds,
        "rows": result.rows,
        "rows_per_second": result.rows / seconds,
        "applied": result.applied,
        "unchanged": result.unchanged,
        "rejected": result.rejected,
        "events_appended": after - before,
        "phases": result.as_dict()["seconds"],
        "shares": result.shares,
        # CPU seconds by part while the delivery was applied (the projections catch up
        # after it, see `quiet`), and the write-ahead log it made PostgreSQL write.
        "cpu_seconds": cpu.seconds,
        "wal_megabytes": wal_bytes / 1e6,
    }


def _wal_position(database_url: str) -> int:
    """The write-ahead log's position, in bytes."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
    assert row is not None
    return int(row[0])


BASELINE_SETUP = """
CREATE TABLE baseline_levels (supplier_sku text PRIMARY KEY, quantity bigint NOT NULL,
                              observed_at timestamptz NOT NULL)
"""
BASELINE_DIFF = """
WITH changed AS (
    INSERT INTO baseline_levels AS b (supplier_sku, quantity, observed_at)
    SELECT supplier_sku, quantity * CASE unit WHEN 'CS' THEN 12 ELSE 1 END, observed_at
    FROM baseline_staging
    ON CONFLICT (supplier_sku) DO UPDATE
        SET quantity = excluded.quantity, observed_at = excluded.observed_at
        WHERE b.quantity <> excluded.quantity
    RETURNING 1
) SELECT count(*) AS changed FROM changed
"""


def baseline_ingest(database_url: str, body: bytes) -> dict[str, Any]:
    started = time.perf_counter()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "CREATE TEMPORARY TABLE baseline_staging (supplier_sku text, upc text,"
            " quantity bigint, unit text, observed_at timestamptz) ON COMMIT DROP"
        )
        with (
            conn.cursor() as cursor,
            cursor.copy("COPY baseline_staging FROM STDIN WITH (FORMAT csv, HEADER true)") as copy,
        ):
            for start in range(0, len(body), 1 << 20):
                copy.write(body[start : start + (1 << 20)])
        row = conn.execute(BASELINE_DIFF).fetchone()
    seconds = time.perf_counter() - started
    rows = body.count(b"\n") - 1
    return {
        "seconds": seconds,
        "rows": rows,
        "rows_per_second": rows / seconds,
        "changed": row[0] if row else 0,
    }


def run(server_url: str, rows: int | None = None) -> list[dict[str, Any]]:
    size = rows or rows_setting()
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    catalogue = Catalogue(size, seed=7, observed_at=at)
    results = []
    with fresh_database(server_url) as database_url, bulk_ledger(database_url) as bulk:
        runtime = bulk.runtime
        say(f"ingest: {size:,} mappings and SKUs...")
        setup_seconds = setup(runtime, catalogue, at)
        say(f"ingest: set up in {setup_seconds:.0f} s (not a measured figure)")
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(BASELINE_SETUP)
        for version, label in (
            (1, "first delivery (every row new)"),
            (2, f"{CHANGED:.0%} of quantities changed"),
        ):
            if version == 2:
                catalogue.advance(CHANGED, at + timedelta(minutes=10))
            buffer = io.BytesIO()
            write_csv(catalogue.items(), buffer)
            body = buffer.getvalue()
            quiet(runtime, database_url)
            baseline = baseline_ingest(database_url, body)
            ledger = ledger_ingest(bulk, database_url, body, version)
            say(
                f"ingest v{version}: ledger {ledger['seconds']:.1f} s, baseline "
                f"{baseline['seconds']:.1f} s, {ledger['events_appended']:,} events"
            )
            results.append(
                {
                    "kind": "ingest",
                    "workload": f"feed ingest, {size:,}-row CSV, {label}",
                    "ledger": ledger,
                    "baseline": baseline,
                    "ratio": ledger["rows_per_second"] / baseline["rows_per_second"],
                    "target_seconds": 10 if version == 2 else None,
                    "setup_seconds": setup_seconds,
                }
            )
    return results


def describe(row: dict[str, Any]) -> str:
    ledger, baseline = row["ledger"], row["baseline"]
    target = f"; target ≤ {row['target_seconds']} s" if row.get("target_seconds") else ""
    phases = f"; {describe_phases(ledger['phases'])}" if ledger.get("phases") else ""
    if "views_seconds" in ledger:
        phases += f"; every view shows it {ledger['views_seconds']:.1f} s after it began"
    if ledger.get("shares", 1) > 1:
        phases += f"; read and compared in {ledger['shares']} shares at once"
    return (
        f"| {row['workload']} | {ledger['rows_per_second']:,.0f} rows/s"
        f" ({ledger['seconds']:.1f} s, {ledger['applied']:,} changed,"
        f" {ledger['events_appended']:,} events{target}{phases}) |"
        f" COPY + SQL diff: {baseline['rows_per_second']:,.0f} rows/s"
        f" ({baseline['seconds']:.1f} s, {baseline['changed']:,} changed) |"
        f" {row['ratio']:.2f}x |"
    )


def footnote(row: dict[str, Any]) -> str | None:
    """Where the ledger's CPU went while it applied a delivery, and the log it wrote."""
    ledger = row["ledger"]
    if "cpu_seconds" not in ledger:
        return None
    cpu = ", ".join(f"{part} {seconds:.1f}" for part, seconds in ledger["cpu_seconds"].items())
    return (
        f"{row['workload']}: CPU seconds while applied: {cpu}"
        f" ({sum(ledger['cpu_seconds'].values()):.1f} in all, in {ledger['seconds']:.1f} s on"
        f" {os.cpu_count()} cores); write-ahead log {ledger['wal_megabytes']:,.0f} MB"
    )
