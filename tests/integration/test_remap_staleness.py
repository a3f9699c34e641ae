"""A level a remap retired, as the stock view answers it.

Found by a merchandiser's walkthrough: the 0 left on a SKU when its supplier's SKU was
mapped elsewhere aged like a report, and the SKU read `updating` for good once the
supplier's staleness limit had passed; the sweeper gave the remap's time as the
supplier's last report.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from api.runtime import Runtime
from ledger.commands import Observation, PutMappings, ReportStock
from ledger.mapping import MappingSpec
from tests.conftest import random_sku
from tests.integration.ledger_setup import CAUSE, now, put_supplier, stock_sku


def test_a_sku_whose_only_other_supplier_was_mapped_away_reads_fresh(ledger: Runtime) -> None:
    sku, elsewhere = random_sku(), random_sku()
    stock_sku(ledger.writer, sku, 50, "steady")
    put_supplier(ledger.writer, "movable", stale_after_seconds=1, exclude_after_seconds=2)
    mapped = [MappingSpec("M1", sku, 1)]
    ledger.writer.execute(
        PutMappings(at=now(), cause=CAUSE, supplier_id="movable", mappings=mapped)
    )
    reported_at = now()
    ledger.writer.execute(
        ReportStock(
            at=reported_at,
            cause=CAUSE,
            supplier_id="movable",
            delivery_id="d1",
            content_hash="h1",
            source="test",
            rows=1,
            observations=[
                Observation(index=0, supplier_sku="M1", quantity=10, observed_at=reported_at)
            ],
        )
    )
    remapped = [MappingSpec("M1", elsewhere, 1)]
    outcome = ledger.writer.execute(
        PutMappings(at=now(), cause=CAUSE, supplier_id="movable", mappings=remapped)
    )
    time.sleep(2.5)  # past the supplier's limits
    stock_sku(ledger.writer, sku, 51, "steady")
    ledger.views.wait_for("stock", ledger.app.recorder.max_notification_id(), timeout=20)
    assert outcome.position is not None

    [levels] = ledger.views.availability([sku], datetime.now(UTC)).values()
    assert (levels.available, levels.stale) == (51, False)
    assert {(s.supplier_id, s.quantity, s.stale) for s in levels.suppliers} == {
        ("steady", 51, False),
        ("movable", 0, False),
    }
    # Its last report is the one the remap moved to the other SKU, not the remap's time.
    assert ledger.views.last_reports()["movable"] == reported_at
