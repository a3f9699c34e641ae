"""The benchmarks' machine probe: a fixed amount of work, timed, on this machine's PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from bench.harness import PROBE_LOOP, CpuMeter, describe_probes, machine_probe


@pytest.mark.alone
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


def test_a_part_started_by_another_is_counted_once() -> None:
    """The feed ingest measures its own process, which started the projections worker:
    the worker's CPU is the worker's part, not also the ingest's."""
    # The child burns CPU, says so, then waits (alive, to be read) until told to end.
    burn = (
        "import sys, time\nend = time.process_time() + 0.6\n"
        "while time.process_time() < end: pass\nprint('burnt', flush=True)\nsys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        with CpuMeter({"parent": os.getpid(), "child": child.pid}) as cpu:
            assert child.stdout.readline() == "burnt\n"
    finally:
        child.stdin.close()
        child.wait()
    assert cpu.seconds["child"] >= 0.3
    # Only what this process did while it waited, not the child's loop again.
    assert cpu.seconds["parent"] < 0.2
