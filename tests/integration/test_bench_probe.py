"""The benchmarks' machine probe: a fixed amount of work, timed, on this machine's PostgreSQL."""

from __future__ import annotations

import time

from bench.harness import PROBE_LOOP, describe_probes, machine_probe


def test_the_probe_times_a_fixed_loop_and_query(postgres_server_url: str) -> None:
    started = time.perf_counter()
    probe = machine_probe(postgres_server_url)
    took = time.perf_counter() - started
    assert set(probe) == {"python_seconds", "postgres_seconds"}
    # Each the best of two runs, both inside what the probe took in all.
    assert 0 < 2 * probe["python_seconds"] + 2 * probe["postgres_seconds"] <= took
    # Ten million additions take a CPython of this era well over 10 ns each.
    assert probe["python_seconds"] > PROBE_LOOP * 1e-8


def test_the_probes_are_told_in_one_line() -> None:
    line = describe_probes(
        [
            {"when": "before reservations", "python_seconds": 0.861, "postgres_seconds": 0.25},
            {"when": "at the end", "python_seconds": 1.4, "postgres_seconds": 0.402},
        ]
    )
    assert "before reservations 0.86 / 0.25, at the end 1.40 / 0.40." in line
