"""`make bench`: every workload on a fresh database, figures beside their baselines.

Writes bench/results/latest.json and bench/results/latest.md.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

from bench import reservations
from bench.harness import postgres

RESULTS = Path(__file__).with_name("results")


def main() -> None:
    seconds = int(os.environ.get("BENCH_SECONDS", "10"))
    with postgres() as server_url:
        rows = reservations.run(server_url, seconds=seconds)
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "at": datetime.now(UTC).isoformat(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "seconds_per_run": seconds,
    }
    (RESULTS / "latest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = [
        "| workload | Stockledger | baseline (same run) | ratio |",
        "|---|---|---|---|",
        *(reservations.describe(row) for row in rows),
    ]
    (RESULTS / "latest.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    for row in rows:
        print(
            f"{row['workload']}: load generator used "
            f"{row['ledger']['load']['generator_cores']:.2f} cores against the ledger, "
            f"{row['baseline']['load']['generator_cores']:.2f} against the baseline"
        )


if __name__ == "__main__":
    main()
