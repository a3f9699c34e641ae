"""Code run in separate processes by the multi-process tests (importable by spawn)."""

from __future__ import annotations

import multiprocessing
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from api.runtime import open_runtime
from api.settings import Settings
from ledger.errors import InsufficientStock
from tests.integration.ledger_setup import reserve


def reserve_in_process(
    start: Barrier,
    database_url: str,
    sku: str,
    attempts: int,
    threads: int,
    key: str | None = None,
) -> list[str]:
    """Tries `attempts` one-unit reservations from `threads` threads; returns the granted ids."""
    settings = Settings.model_validate({"database_url": database_url, "api_keys": ""})
    runtime = open_runtime(settings, migrate_first=False, sweep=False)
    granted: list[str] = []
    lock = threading.Lock()

    def attempt(_: int) -> None:
        try:
            outcome = runtime.writer.execute(reserve([(sku, 1)], key=key, order_id=key))
        except InsufficientStock:
            return
        with lock:
            granted.append(str(outcome.value.reservation.id))

    try:
        start.wait(30)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(attempt, range(attempts)))
    finally:
        runtime.close()
    return granted


def order_spread_in_process(
    start: Barrier, database_url: str, skus: list[str], attempts: int, threads: int, seed: int
) -> list[str]:
    """Tries `attempts` orders of one unit of one SKU or of each of two, drawn from `skus`,
    from `threads` threads; returns the SKUs of every line granted (once a line), then
    how many times its writer collided with another process, as "conflicts=N"."""
    settings = Settings.model_validate({"database_url": database_url, "api_keys": ""})
    runtime = open_runtime(settings, migrate_first=False, sweep=False)
    draw = random.Random(seed)
    orders = [draw.sample(skus, draw.choice((1, 2))) for _ in range(attempts)]
    granted: list[str] = []
    lock = threading.Lock()

    def attempt(lines: list[str]) -> None:
        try:
            runtime.writer.execute(reserve([(sku, 1) for sku in lines]))
        except InsufficientStock:
            return
        with lock:
            granted.extend(lines)

    try:
        start.wait(30)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(attempt, orders))
        conflicts = runtime.writer.conflicts
    finally:
        runtime.close()
    return [*granted, f"conflicts={conflicts}"]


def compete(
    database_url: str, sku: str, processes: int, attempts: int, threads: int, key: str | None = None
) -> list[list[str]]:
    """Starts the processes together; returns what each one was granted."""
    work = (database_url, sku, attempts, threads, key)
    return _together(reserve_in_process, [work] * processes)


def compete_spread(
    database_url: str, skus: list[str], processes: int, attempts: int, threads: int
) -> list[list[str]]:
    """Starts the processes together on orders spread over `skus`; returns what each one
    returned (see `order_spread_in_process`)."""
    return _together(
        order_spread_in_process,
        [(database_url, skus, attempts, threads, seed) for seed in range(processes)],
    )


def _together(work: Callable[..., list[str]], arguments: list[tuple[Any, ...]]) -> list[list[str]]:
    """Runs `work(start, *args)` in a process of its own for each `args`, all let go at
    once (every process waits at the barrier `start` with its ledger open, so that they
    really compete); returns what each returned."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(len(arguments))
    results: Queue[list[str] | str] = context.Queue()
    workers = [
        context.Process(target=_report, args=(results, work, start, *args)) for args in arguments
    ]
    for worker in workers:
        worker.start()
    answers = [_next_result(results, workers) for _ in workers]
    failures = [answer for answer in answers if isinstance(answer, str)]
    assert not failures, failures
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    return [answer for answer in answers if not isinstance(answer, str)]


def _report(results: Queue[list[str] | str], work: Callable[..., list[str]], *args: object) -> None:
    try:
        results.put(work(*args))
    except Exception as error:  # reported to the test, which fails with it
        results.put(repr(error))


def _next_result(
    results: Queue[list[str] | str], workers: Sequence[multiprocessing.process.BaseProcess]
) -> list[str] | str:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if dead:
                return f"a competing process died with exit code {dead[0]}"
    return "the competing processes did not finish in time"
