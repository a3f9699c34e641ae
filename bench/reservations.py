"""Reservations and availability reads over HTTP: the ledger beside per-request baselines.

Reservations go to one hot SKU, then across 10,000 SKUs; the baseline is a FastAPI +
psycopg service running one conditional UPDATE per request. Availability reads (random
SKUs of the 10,000, 16 and 64 clients) are set beside a trivial FastAPI endpoint that
returns a constant body. Both services run with the same number of uvicorn workers on
the same PostgreSQL, under the same wrk load, in the same run. The ledger is then checked
for oversold units and for holds it lost.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import (
    CpuMeter,
    Load,
    free_port,
    fresh_database,
    projecting,
    serving,
    wrk,
)
from projections.queries import POSITION_SQL

RESERVE = Path(__file__).with_name("reserve.lua")
READ = Path(__file__).with_name("read.lua")
KEYS = "admin:admin:bench-admin,oms:oms:bench-oms,shop:storefront:bench-shop"
ADMIN = {"Authorization": "Bearer bench-admin"}
SHOP = {"Authorization": "Bearer bench-shop"}
HOT_STOCK = 10_000_000
SPREAD = 10_000
SPREAD_STOCK = 100_000
READ_CLIENTS = (16, 64)
# The flash sale that sells out: this many units of one SKU, ordered one at a time for
# SELL_OUT_SECONDS, several times over what it holds.
SELL_OUT_STOCK = 3_000
SELL_OUT_SECONDS = 5
# A load generator thread past this share of a core may be what limits a row.
GENERATOR_THREADS = 2
BUSY_GENERATOR_THREAD = 0.8


def sku_names(skus: int) -> list[str]:
    return ["HOT"] if skus == 1 else [f"S{number:05d}" for number in range(1, skus + 1)]


def load_env(skus: int, token: str) -> dict[str, str]:
    if skus == 1:
        return {"BENCH_SKU": "HOT", "BENCH_TOKEN": token}
    return {"BENCH_SKUS": str(skus), "BENCH_TOKEN": token}


# The ledger -------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """The ledger serving at `url`, and its processes' ids by part (for `CpuMeter`)."""

    url: str
    processes: dict[str, int]


@contextmanager
def ledger_serving(
    database_url: str, workers: int, settings: dict[str, str] | None = None
) -> Iterator[Deployment]:
    """The ledger as deployed under load: API workers, and the projections in a worker
    process of their own (`ledger projections run`), all on the same two cores; `settings`
    adds environment variables to both."""
    port = free_port()
    env = {
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_API_KEYS": KEYS,
        "LEDGER_LOG_LEVEL": "WARNING",
        "LEDGER_LOG_FORMAT": "json",
        "LEDGER_RUN_PROJECTIONS": "false",
        **(settings or {}),
    }
    command = [sys.executable, "-m", "api", "serve", "--port", str(port)]
    command += ["--workers", str(workers)]
    with serving(command, env, "/readyz", port) as api, projecting(env) as projections:
        yield Deployment(api.url, {"api": api.pid, "projections": projections})


def stock_catalogue(base: str, skus: list[str], quantity: int) -> None:
    """A supplier with `quantity` of every SKU (not a measured figure)."""
    httpx.put(f"{base}/v1/suppliers/bench", json={"name": "Bench"}, headers=ADMIN)
    with httpx.Client(base_url=base, headers=ADMIN, timeout=30) as client:

        def put(sku: str) -> None:
            client.put(f"/v1/skus/{sku}", json={"safety_stock": 0}).raise_for_status()

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, skus))
        for start in range(0, len(skus), 1000):
            observations = [
                {"sku": sku, "quantity": quantity, "observed_at": _now()}
                for sku in skus[start : start + 1000]
            ]
            client.post(
                "/v1/suppliers/bench/stock", json={"observations": observations}
            ).raise_for_status()


def stock_check(base: str, skus: list[str]) -> dict[str, int]:
    """Held, committed and oversold units over the SKUs, once the view has caught up."""
    previous: dict[str, int] | None = None
    deadline = time.monotonic() + 30
    while True:
        totals = {"held": 0, "committed": 0, "oversold": 0}
        with httpx.Client(base_url=base, headers=SHOP, timeout=30) as client:
            for start in range(0, len(skus), 100):
                batch = skus[start : start + 100]
                answer = client.get("/v1/availability", params={"sku": batch})
                answer.raise_for_status()
                for levels in answer.json()["items"]:
                    totals["held"] += levels["held"]
                    totals["committed"] += levels["committed"]
                    promised = levels["held"] + levels["committed"]
                    totals["oversold"] += max(0, promised - levels["sellable"])
        if totals == previous or time.monotonic() > deadline:
            return totals
        previous = totals
        time.sleep(0.5)


def ledger_run(
    server_url: str, workers: int, seconds: int, connections: int, skus: int
) -> dict[str, Any]:
    names = sku_names(skus)
    with (
        fresh_database(server_url) as database_url,
        ledger_serving(database_url, workers) as deployment,
    ):
        base = deployment.url
        stock_catalogue(base, names, HOT_STOCK if skus == 1 else SPREAD_STOCK)
        env = load_env(skus, "bench-oms")
        warmup = wrk(base, RESERVE, env, 2, connections)
        before = writer_counts(base)
        with view_lag(database_url) as lag, CpuMeter(deployment.processes) as cpu:
            load = wrk(base, RESERVE, env, seconds, connections)
        writer = writer_summary(before, writer_counts(base), load.seconds)
        check = stock_check(base, names)
        sold_out = sell_out(base, connections) if skus == 1 else None
        reads = {}
        if skus > 1:
            read_env = {"BENCH_PATH": "/v1/availability/S%05d", **load_env(skus, "bench-shop")}
            for clients in READ_CLIENTS:
                wrk(base, READ, read_env, 2, clients)
                reads[clients] = asdict(wrk(base, READ, read_env, seconds, clients))
    granted = warmup.ok + load.ok
    return {
        "load": asdict(load),
        "reservations_per_second": load.ok_per_second,
        "granted": granted,
        "held": check["held"],
        "oversold_units": check["oversold"],
        # wrk stops counting with requests still in flight: the ledger granted those too,
        # so up to one per connection per run is held without being counted here.
        "lost_holds": max(0, granted - check["held"]),
        "uncounted_holds": max(0, check["held"] - granted),
        "reads": reads,
        "view_lag": lag.summary(load.ok_per_second * EVENTS_PER_RESERVATION),
        "cpu_ms_per_request": cpu.per(load.ok),
        "writer": writer,
        "sell_out": sold_out,
    }


def sell_out(base: str, connections: int) -> dict[str, Any]:
    """A flash sale that sells out: a SKU holding SELL_OUT_STOCK units, ordered one unit an
    order by `connections` clients for SELL_OUT_SECONDS, far past its stock. The orders
    granted are counted by the load generator (its 2xx answers), not by the ledger: more
    of them than the stock is overselling whatever the ledger's own views say. wrk stops
    counting with up to one order a connection in flight, so it may count up to that many
    fewer than the ledger holds, never more."""
    stock_catalogue(base, ["LAST"], SELL_OUT_STOCK)
    env = {"BENCH_SKU": "LAST", "BENCH_TOKEN": "bench-oms"}
    load = wrk(base, RESERVE, env, SELL_OUT_SECONDS, connections)
    check = stock_check(base, ["LAST"])
    return {
        "stock": SELL_OUT_STOCK,
        "granted_counted": load.ok,
        "refused": load.non_2xx,
        "socket_errors": load.socket_errors,
        "held": check["held"],
        "oversold_counted": max(0, load.ok - SELL_OUT_STOCK),
        "oversold_view": check["oversold"],
        "p99_ms": load.p99_ms,
    }


def generator_note(load: Load) -> str:
    """The load generator's CPU, and a warning where a thread of it may have been busy
    enough to limit the row (wrk's threads share the connections evenly)."""
    per_thread = load.generator_cores / GENERATOR_THREADS
    note = f"{load.generator_cores:.2f} cores ({per_thread:.2f} a thread)"
    if per_thread > BUSY_GENERATOR_THREAD:
        note += " **the load generator may be what limits this row**"
    return note


# The writer's own counts (GET /metrics, summed over the API workers).
WRITER_COUNTS = (
    "ledger_writer_batch_commands_count",
    "ledger_writer_batch_commands_sum",
    "ledger_writer_batch_seconds_sum",
    "ledger_writer_conflicts_total",
    "ledger_writer_exclusive_saves_total",
    "ledger_writer_kept_tries_total",  # summed over outcomes
)


def writer_counts(base: str) -> dict[str, float]:
    answer = httpx.get(f"{base}/metrics", timeout=30)
    answer.raise_for_status()
    counts = dict.fromkeys(WRITER_COUNTS, 0.0)
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name in counts:
                counts[sample.name] += sample.value
    return counts


def writer_summary(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    """Batches a second, commands a batch, milliseconds from gathered to answered, the
    saves that collided with another worker's or held the event table's lock, and the
    tries decided on the writer's kept copies without asking the store."""
    batches, commands, busy, conflicts, exclusive, kept = (
        after[name] - before[name] for name in WRITER_COUNTS
    )
    return {
        "batches_per_second": batches / seconds,
        "commands_per_batch": commands / max(batches, 1),
        "ms_per_batch": 1000 * busy / max(batches, 1),
        "conflicts": conflicts,
        "exclusive_saves": exclusive,
        "kept_tries_per_batch": kept / max(batches, 1),
    }


# Each one-line order appends two events: the reservation's and its SKU's.
EVENTS_PER_RESERVATION = 2
LAG_SAMPLE_SECONDS = 0.05
HEAD_SQL = "SELECT coalesce(max(notification_id), 0) FROM inventoryledger_events"


class _Lag:
    """How far the stock view trailed the log, sampled while the load ran."""

    def __init__(self) -> None:
        self.events: list[int] = []

    def summary(self, events_per_second: float) -> dict[str, float]:
        """Median, p90 and worst, in events behind and in seconds at the load's rate."""
        ordered = sorted(self.events) or [0]
        picks = {
            "median": ordered[len(ordered) // 2],
            "p90": ordered[int(len(ordered) * 0.9)],
            "max": ordered[-1],
        }
        rate = max(events_per_second, 1.0)
        return {
            **{f"{name}_events": value for name, value in picks.items()},
            **{f"{name}_seconds": value / rate for name, value in picks.items()},
        }


@contextmanager
def view_lag(database_url: str) -> Iterator[_Lag]:
    """Samples the stock view's distance from the head of the log every 50 ms."""
    lag, done = _Lag(), threading.Event()

    def sample() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not done.wait(LAG_SAMPLE_SECONDS):
                head = conn.execute(HEAD_SQL).fetchone()
                view = conn.execute(POSITION_SQL, ("stock",)).fetchone()
                if head is not None and view is not None:
                    lag.events.append(int(head[0]) - int(view[0]))

    sampler = threading.Thread(target=sample, name="view-lag", daemon=True)
    sampler.start()
    try:
        yield lag
    finally:
        done.set()
        sampler.join(5)


# The baseline -----------------------------------------------------------------


def baseline_run(
    server_url: str, workers: int, seconds: int, connections: int, skus: int
) -> dict[str, Any]:
    names = sku_names(skus)
    stock = HOT_STOCK if skus == 1 else SPREAD_STOCK
    with fresh_database(server_url) as database_url:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE baseline_stock (sku text PRIMARY KEY, on_hand int, reserved int)"
            )
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO baseline_stock VALUES (%s, %s, 0)", [(n, stock) for n in names]
                )
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "bench.baseline_app:app"]
        command += ["--port", str(port), "--workers", str(workers)]
        command += ["--log-level", "warning", "--no-access-log"]
        reads = {}
        with serving(command, {"BASELINE_DATABASE_URL": database_url}, "/constant", port) as api:
            base = api.url
            env = load_env(skus, "x")
            warmup = wrk(base, RESERVE, env, 2, connections)
            with CpuMeter({"api": api.pid}) as cpu:
                load = wrk(base, RESERVE, env, seconds, connections)
            if skus > 1:
                read_env = {"BENCH_PATH": "/constant", "BENCH_TOKEN": "x"}
                for clients in READ_CLIENTS:
                    wrk(base, READ, read_env, 2, clients)
                    reads[clients] = asdict(wrk(base, READ, read_env, seconds, clients))
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT sum(greatest(0, reserved - on_hand)) FROM baseline_stock"
            ).fetchone()
    assert row is not None
    return {
        "load": asdict(load),
        "reservations_per_second": load.ok_per_second,
        "granted": warmup.ok + load.ok,
        "oversold_units": int(row[0] or 0),
        "reads": reads,
        "cpu_ms_per_request": cpu.per(load.ok),
    }


def _now() -> str:
    return datetime.now(UTC).isoformat()


# The rows ---------------------------------------------------------------------


def run(server_url: str, seconds: int = 10, connections: int = 64) -> list[dict[str, Any]]:
    rows = []
    for workers in (1, 2):
        for skus in (1, SPREAD):
            ledger = ledger_run(server_url, workers, seconds, connections, skus)
            baseline = baseline_run(server_url, workers, seconds, connections, skus)
            where = "one hot SKU" if skus == 1 else f"{skus:,} SKUs"
            rows.append(
                {
                    "workload": (
                        f"reservations, {where}, {connections} clients, {workers} worker(s)"
                    ),
                    "workers": workers,
                    "ledger": ledger,
                    "baseline": baseline,
                    "ratio": ledger["reservations_per_second"]
                    / baseline["reservations_per_second"],
                }
            )
            for clients in ledger["reads"]:
                read, constant = ledger["reads"][clients], baseline["reads"][clients]
                rows.append(
                    {
                        "workload": (
                            f"availability reads, {skus:,} SKUs, {clients} clients,"
                            f" {workers} worker(s)"
                        ),
                        "kind": "reads",
                        "ledger": {"load": read},
                        "baseline": {"load": constant},
                        "ratio": Load(**read).ok_per_second / Load(**constant).ok_per_second,
                    }
                )
    return rows


def describe(row: dict[str, Any]) -> str:
    ledger, baseline = row["ledger"], row["baseline"]
    lload, bload = Load(**ledger["load"]), Load(**baseline["load"])
    if row.get("kind") == "reads":
        return (
            f"| {row['workload']} | {lload.ok_per_second:.0f} req/s (p50 {lload.p50_ms:.1f} ms,"
            f" p99 {lload.p99_ms:.1f} ms, non-2xx {lload.non_2xx}) | trivial endpoint:"
            f" {bload.ok_per_second:.0f} req/s (p50 {bload.p50_ms:.1f} ms,"
            f" p99 {bload.p99_ms:.1f} ms) | {row['ratio']:.2f}x (target ≥ 0.7x) |"
        )
    lag = ledger.get("view_lag")
    trailing = (
        f", stock view behind by {1000 * lag['median_seconds']:.0f}/"
        f"{1000 * lag['p90_seconds']:.0f}/{1000 * lag['max_seconds']:.0f} ms"
        if lag
        else ""
    )
    sold = ledger.get("sell_out")
    sale = (
        f"; sold out: {sold['stock']:,} units, {sold['granted_counted']:,} orders granted"
        f" by wrk's count ({sold['refused']:,} refused), held {sold['held']:,},"
        f" oversold {sold['oversold_counted']}"
        if sold
        else ""
    )
    return (
        f"| {row['workload']} | {ledger['reservations_per_second']:.0f}/s "
        f"(p50 {lload.p50_ms:.1f} ms, p99 {lload.p99_ms:.1f} ms, "
        f"oversold {ledger['oversold_units']}, holds lost {ledger['lost_holds']}{trailing}"
        f"{sale}) |"
        f" {baseline['reservations_per_second']:.0f}/s "
        f"(p50 {bload.p50_ms:.1f} ms, p99 {bload.p99_ms:.1f} ms) | {row['ratio']:.2f}x |"
    )


def _one_writer(row: dict[str, Any]) -> str:
    """A warning for a row of several workers in which one writer took every order.

    A writer tries on its kept copies only after a second with no sign of another
    process saving (ledger.hot): where most batches did so, no other worker saved, as
    happens when the kernel hands all of the load generator's connections, opened at
    once, to one API process. The row then measured one writer, not several."""
    if row.get("workers", 1) > 1 and row["ledger"]["writer"].get("kept_tries_per_batch", 0) > 0.5:
        return (
            " (so one worker's writer took every order: the load generator's connections"
            " all went to one API process, and this row measured one writer)"
        )
    return ""


def footnote(row: dict[str, Any]) -> str | None:
    """Where a reservations row's CPU went, per reservation, on both sides, and what the
    ledger's writer did; for a reads row, the load generator's CPU. None for a row from
    an earlier run without these."""
    ledger, baseline = row["ledger"], row["baseline"]
    if row.get("kind") == "reads":
        return (
            f"{row['workload']}: load generator {generator_note(Load(**ledger['load']))}"
            f" against the ledger, {generator_note(Load(**baseline['load']))} against the"
            " trivial endpoint."
        )
    if "cpu_ms_per_request" not in ledger:
        return None

    def parts(cpu: dict[str, float]) -> str:
        named = ", ".join(f"{part} {ms:.3f}" for part, ms in cpu.items())
        return f"{named} ({sum(cpu.values()):.3f} in all)"

    writer = ledger["writer"]
    return (
        f"{row['workload']}: CPU ms per reservation, ledger: {parts(ledger['cpu_ms_per_request'])};"
        f" baseline: {parts(baseline['cpu_ms_per_request'])}. Writer:"
        f" {writer['batches_per_second']:.0f} batches/s of {writer['commands_per_batch']:.1f}"
        f" commands, {writer['ms_per_batch']:.1f} ms each; {writer.get('conflicts', 0):.0f}"
        f" conflicts, {writer.get('exclusive_saves', 0):.0f} exclusive saves,"
        f" {writer.get('kept_tries_per_batch', 0):.0%} of batches tried on kept copies"
        f"{_one_writer(row)}. Load generator:"
        f" {generator_note(Load(**ledger['load']))} against the ledger,"
        f" {generator_note(Load(**baseline['load']))} against the baseline."
    )
