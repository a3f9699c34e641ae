"""Reservations while a large delivery applies: what a flash sale feels of a supplier feed.

One ledger server (one API worker, the projections in a worker of their own) takes
reservations across 10,000 SKUs from 64 clients. A supplier's 200,000-row CSV with 5% of
its quantities changed is uploaded over HTTP a few seconds into a run, and applied by
the same server's writer. The baseline is the same reservations on the same server just
before, with no delivery. Both ways of cutting a delivery into ledger transactions are
measured, each on a server of its own: parts of a fixed `LEDGER_CONNECTOR_BATCH_SIZE`
(`LEDGER_CONNECTOR_PART_SECONDS=0`), and parts sized to hold the writer for the default
quarter second.

wrk gives up on a request after 2 s and counts it as a timeout, not in the latencies:
the timeouts column is the reservations that waited that long.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from bench import ingest, reservations
from bench.harness import Load, fresh_database, wrk
from connectors.simulator import Catalogue, write_csv

DEFAULT_ROWS = 200_000
WINDOW_SECONDS = 30
DELIVERY_AFTER_SECONDS = 2
MODES = (("fixed parts of 5,000", "0"), ("parts of ~0.25 s", "0.25"))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _deliver(base: str, body: bytes, name: str, out: dict[str, Any]) -> None:
    """Uploads the file after a pause, then waits until the server has applied it."""
    time.sleep(DELIVERY_AFTER_SECONDS)
    started = time.perf_counter()
    headers = {"Authorization": "Bearer bench-admin"}
    answer = httpx.post(
        f"{base}/v1/suppliers/{ingest.SUPPLIER}/feeds",
        params={"format": "csv", "name": name},
        content=body,
        headers={**headers, "X-Ledger-Delivery": name},
        timeout=120,
    )
    answer.raise_for_status()
    location = answer.headers["location"]
    while True:
        status = httpx.get(f"{base}{location}", headers=headers, timeout=30).json()
        if status["status"] not in ("queued", "processing"):
            break
        time.sleep(0.1)
    out["seconds"] = time.perf_counter() - started
    out["status"] = status


def run(server_url: str, rows: int | None = None) -> list[dict[str, Any]]:
    size = rows or int(os.environ.get("BENCH_MIXED_ROWS", DEFAULT_ROWS))
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    catalogue = Catalogue(size, seed=11, observed_at=at)
    names = reservations.sku_names(reservations.SPREAD)
    results = []
    with fresh_database(server_url) as database_url:
        with ingest.bulk_ledger(database_url) as bulk:
            runtime = bulk.runtime
            say(f"mixed: {size:,} mappings and SKUs, and their first delivery...")
            ingest.setup(runtime, catalogue, at)
            buffer = io.BytesIO()
            write_csv(catalogue.items(), buffer)
            ingest.ledger_ingest(bulk, database_url, buffer.getvalue(), 1)
        for number, (label, part_seconds) in enumerate(MODES, start=2):
            catalogue.advance(ingest.CHANGED, at + timedelta(minutes=number))
            buffer = io.BytesIO()
            write_csv(catalogue.items(), buffer)
            settings = {"LEDGER_CONNECTOR_PART_SECONDS": part_seconds}
            with reservations.ledger_serving(database_url, 1, settings) as deployment:
                base = deployment.url
                if number == 2:
                    reservations.stock_catalogue(base, names, reservations.SPREAD_STOCK)
                load_env = reservations.load_env(reservations.SPREAD, "bench-oms")
                wrk(base, reservations.RESERVE, load_env, 2, 64)
                alone = wrk(base, reservations.RESERVE, load_env, WINDOW_SECONDS // 2, 64)
                delivery: dict[str, Any] = {}
                sender = threading.Thread(
                    target=_deliver, args=(base, buffer.getvalue(), f"mixed-v{number}", delivery)
                )
                sender.start()
                during = wrk(base, reservations.RESERVE, load_env, WINDOW_SECONDS, 64)
                sender.join()
            say(
                f"mixed, {label}: delivery {delivery['seconds']:.1f} s; reservations p99"
                f" {during.p99_ms:.0f} ms ({during.socket_errors} timeouts) against"
                f" {alone.p99_ms:.0f} ms alone"
            )
            results.append(
                {
                    "kind": "mixed",
                    "workload": f"reservations (10,000 SKUs, 64 clients) during a {size:,}-row"
                    f" delivery with 5% changed, {label}",
                    "ledger": {
                        "load": asdict(during),
                        "delivery_seconds": delivery["seconds"],
                        "delivery_status": delivery["status"]["status"],
                        "applied": delivery["status"]["applied"],
                    },
                    "baseline": {"load": asdict(alone)},
                    "ratio": during.ok_per_second / alone.ok_per_second,
                    "part_seconds": float(part_seconds),
                }
            )
    return results


def describe(row: dict[str, Any]) -> str:
    during, alone = Load(**row["ledger"]["load"]), Load(**row["baseline"]["load"])
    ledger = row["ledger"]
    return (
        f"| {row['workload']} | {during.ok_per_second:.0f}/s (p50 {during.p50_ms:.0f} ms,"
        f" p99 {during.p99_ms:.0f} ms, max {during.max_ms:.0f} ms, timeouts > 2 s"
        f" {during.socket_errors}; delivery {ledger['delivery_status']} in"
        f" {ledger['delivery_seconds']:.1f} s, {ledger['applied']:,} changed) |"
        f" no delivery: {alone.ok_per_second:.0f}/s (p50 {alone.p50_ms:.0f} ms,"
        f" p99 {alone.p99_ms:.0f} ms, timeouts {alone.socket_errors}) |"
        f" {row['ratio']:.2f}x |"
    )
