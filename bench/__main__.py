"""`make bench`: every workload on a fresh database, figures beside their baselines.

Writes bench/results/latest.json and bench/results/latest.md.

BENCH_WORKLOADS (comma-separated, default all: reservations, ingest, mixed, projections)
runs only some of them; the rows of the others are then kept from the previous results,
marked as such.
BENCH_SECONDS sets the length of each reservations run, BENCH_EVENTS the size of the log
the projections benchmark builds (default 1,000,000).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import ingest, mixed, projections, reservations
from bench.harness import describe_probes, machine_probe, postgres

RESULTS = Path(__file__).with_name("results")
WORKLOADS = ("reservations", "ingest", "mixed", "projections")
DESCRIBE: dict[str, Callable[[dict[str, Any]], str]] = {
    "ingest": ingest.describe,
    "mixed": mixed.describe,
    "reservations": reservations.describe,
    "projections": projections.describe,
}


def _earlier_rows(skipped: set[str]) -> list[dict[str, Any]]:
    """The previous run's rows of the workloads not run now, marked with when they ran."""
    try:
        earlier = json.loads((RESULTS / "latest.json").read_text())
    except (OSError, ValueError):
        return []
    rows = []
    for row in earlier.get("rows", []):
        bench = row.get("bench", "reservations")
        if bench in skipped:
            row.setdefault("bench", bench)
            row.setdefault("from_earlier_run", earlier.get("meta", {}).get("at"))
            rows.append(row)
    return rows


def _line(row: dict[str, Any]) -> str:
    line = DESCRIBE[row["bench"]](row)
    earlier = row.get("from_earlier_run")
    if earlier:
        line = line.replace(row["workload"], f"{row['workload']} (earlier run, {earlier})", 1)
    return line


def main() -> None:
    seconds = int(os.environ.get("BENCH_SECONDS", "10"))
    events = int(os.environ.get("BENCH_EVENTS", str(projections.DEFAULT_EVENTS)))
    chosen = {
        name.strip() for name in os.environ.get("BENCH_WORKLOADS", ",".join(WORKLOADS)).split(",")
    }
    unknown = chosen - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown BENCH_WORKLOADS {sorted(unknown)}; known: {WORKLOADS}")
    rows: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    with postgres() as server_url:

        def probe(when: str) -> None:
            probes.append({"when": when, **machine_probe(server_url)})

        if "reservations" in chosen:
            probe("before reservations")
            rows += [
                {"bench": "reservations", **row}
                for row in reservations.run(server_url, seconds=seconds)
            ]
        if "ingest" in chosen:
            probe("before ingest")
            rows += [{"bench": "ingest", **row} for row in ingest.run(server_url)]
        if "mixed" in chosen:
            probe("before mixed")
            rows += [{"bench": "mixed", **row} for row in mixed.run(server_url)]
        if "projections" in chosen:
            probe("before projections")
            rows += [
                {"bench": "projections", **row}
                for row in projections.run(server_url, events=events)
            ]
        probe("at the end")
    rows += _earlier_rows(set(WORKLOADS) - chosen)
    rows.sort(key=lambda row: WORKLOADS.index(row["bench"]))
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "at": datetime.now(UTC).isoformat(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "workloads": sorted(chosen, key=WORKLOADS.index),
        "seconds_per_run": seconds,
        "projection_log_events": events,
        "machine_probes": probes,
    }
    (RESULTS / "latest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = [
        "| workload | Stockledger | baseline (same run) | ratio |",
        "|---|---|---|---|",
        *(_line(row) for row in rows),
    ]
    notes = [
        note
        for row in rows
        if not row.get("from_earlier_run")
        for note in [_footnote(row)]
        if note is not None
    ]
    notes.append(describe_probes(probes))
    (RESULTS / "latest.md").write_text("\n".join([*table, "", *notes]) + "\n")
    print("\n".join(table))
    print("\n".join(notes))


def _footnote(row: dict[str, Any]) -> str | None:
    """What a row's figures do not show: where the CPU went, and the like."""
    if row["bench"] == "reservations":
        return reservations.footnote(row)
    if row["bench"] == "projections":
        return projections.footnote(row)
    if row["bench"] == "ingest":
        return ingest.footnote(row)
    return None


if __name__ == "__main__":
    main()
