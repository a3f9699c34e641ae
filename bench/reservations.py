"""Reservations over HTTP on one hot SKU: the ledger beside a one-UPDATE-per-request baseline.

Both run with the same number of uvicorn workers on the same PostgreSQL, under the same
wrk load, in the same run. The ledger is then checked for oversold units.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.harness import free_port, fresh_database, serving, wrk

SCRIPT = Path(__file__).with_name("reserve.lua")
STOCK = 10_000_000
KEYS = "admin:admin:bench-admin,oms:oms:bench-oms,shop:storefront:bench-shop"


def ledger_run(server_url: str, workers: int, seconds: int, connections: int) -> dict[str, Any]:
    with fresh_database(server_url) as database_url:
        port = free_port()
        env = {
            "LEDGER_DATABASE_URL": database_url,
            "LEDGER_API_KEYS": KEYS,
            "LEDGER_LOG_LEVEL": "WARNING",
            "LEDGER_LOG_FORMAT": "json",
        }
        command = [
            sys.executable,
            "-m",
            "api",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        with serving(command, env, "/readyz", port) as base:
            admin = {"Authorization": "Bearer bench-admin"}
            httpx.put(f"{base}/v1/suppliers/bench", json={"name": "Bench"}, headers=admin)
            httpx.put(f"{base}/v1/skus/HOT", json={"safety_stock": 0}, headers=admin)
            report = httpx.post(
                f"{base}/v1/suppliers/bench/stock",
                json={"observations": [{"sku": "HOT", "quantity": STOCK, "observed_at": _now()}]},
                headers=admin,
            )
            report.raise_for_status()
            load_env = {"BENCH_SKU": "HOT", "BENCH_TOKEN": "bench-oms"}
            warmup = wrk(base, SCRIPT, load_env, 2, connections)
            load = wrk(base, SCRIPT, load_env, seconds, connections)
            shop = {"Authorization": "Bearer bench-shop"}
            levels = httpx.get(f"{base}/v1/availability/HOT", headers=shop).json()
    granted = warmup.ok + load.ok
    return {
        "load": asdict(load),
        "reservations_per_second": load.ok_per_second,
        "granted": granted,
        "held": levels["held"],
        "oversold_units": max(0, levels["held"] + levels["committed"] - levels["sellable"]),
        "lost_or_extra_holds": levels["held"] - granted,
    }


def baseline_run(server_url: str, workers: int, seconds: int, connections: int) -> dict[str, Any]:
    with fresh_database(server_url) as database_url:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE baseline_stock (sku text PRIMARY KEY, on_hand int, reserved int)"
            )
            conn.execute("INSERT INTO baseline_stock VALUES ('HOT', %s, 0)", (STOCK,))
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.baseline_app:app",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        with serving(command, {"BASELINE_DATABASE_URL": database_url}, "/constant", port) as base:
            load_env = {"BENCH_SKU": "HOT", "BENCH_TOKEN": "x"}
            warmup = wrk(base, SCRIPT, load_env, 2, connections)
            load = wrk(base, SCRIPT, load_env, seconds, connections)
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT on_hand, reserved FROM baseline_stock").fetchone()
    assert row is not None
    return {
        "load": asdict(load),
        "reservations_per_second": load.ok_per_second,
        "granted": warmup.ok + load.ok,
        "oversold_units": max(0, row[1] - row[0]),
    }


def _now() -> str:
    return datetime.now(UTC).isoformat()


def run(server_url: str, seconds: int = 10, connections: int = 64) -> list[dict[str, Any]]:
    rows = []
    for workers in (1, 2):
        ledger = ledger_run(server_url, workers, seconds, connections)
        baseline = baseline_run(server_url, workers, seconds, connections)
        rows.append(
            {
                "workload": (
                    f"reservations, one hot SKU, {connections} clients, {workers} worker(s)"
                ),
                "ledger": ledger,
                "baseline": baseline,
                "ratio": ledger["reservations_per_second"] / baseline["reservations_per_second"],
            }
        )
    return rows


def describe(row: dict[str, Any]) -> str:
    ledger, baseline = row["ledger"], row["baseline"]
    lload, bload = ledger["load"], baseline["load"]
    return (
        f"| {row['workload']} | {ledger['reservations_per_second']:.0f}/s "
        f"(p50 {lload['p50_ms']:.1f} ms, p99 {lload['p99_ms']:.1f} ms, "
        f"oversold {ledger['oversold_units']}) | {baseline['reservations_per_second']:.0f}/s "
        f"(p50 {bload['p50_ms']:.1f} ms, p99 {bload['p99_ms']:.1f} ms) | {row['ratio']:.2f}x |"
    )
