"""The demo catalogue that `make run` serves: three suppliers, a few SKUs, fresh stock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from api.settings import Settings
from ledger.base import Cause
from ledger.commands import Observation, PutMappings, PutSupplier, ReportStock
from ledger.mapping import MappingSpec
from ledger.supplier import SupplierTerms
from ledger.writer import LedgerWriter

DEMO_KEYS = (
    "admin:admin:demo-admin-key,"
    "oms:oms:demo-oms-key,"
    "storefront:storefront:demo-storefront-key,"
    "auditor:auditor:demo-auditor-key,"
    "acme-feed:supplier:demo-acme-key:acme"
)

SUPPLIERS = {
    "acme": SupplierTerms(
        name="Acme Supply",
        priority=1,
        lead_time_days=2,
        buffer=2,
        stale_after_seconds=3600,
        exclude_after_seconds=86_400,
    ),
    "globex": SupplierTerms(
        name="Globex Wholesale",
        priority=2,
        lead_time_days=1,
        stale_after_seconds=3600,
        exclude_after_seconds=86_400,
        reports_net_of_our_orders=True,
    ),
    "initech": SupplierTerms(
        name="Initech Dropship",
        priority=3,
        lead_time_days=5,
        stale_after_seconds=7200,
        exclude_after_seconds=172_800,
        timezone="Europe/Berlin",
    ),
}

# supplier -> (supplier SKU, internal SKU, units per supplier unit, level in supplier units)
STOCK = {
    "acme": [("ABC-123", "WIDGET-BLUE", 1, 120), ("ABC-124", "WIDGET-RED", 1, 40)],
    "globex": [("G-77", "WIDGET-BLUE", 1, 35), ("G-CASE-9", "GADGET-9", 12, 3)],
    "initech": [("IN-1", "WIDGET-RED", 1, 8), ("IN-2", "GADGET-9", 1, 10)],
}


def seed_demo(writer: LedgerWriter) -> None:
    """Idempotent: terms and mappings are upserts, the stock report is a fresh delivery."""
    at = datetime.now(UTC)
    cause = Cause("demo", "demo.seed", uuid.uuid4().hex)
    for supplier_id, terms in SUPPLIERS.items():
        writer.execute(PutSupplier(at=at, cause=cause, supplier_id=supplier_id, terms=terms))
        rows = STOCK[supplier_id]
        writer.execute(
            PutMappings(
                at=at,
                cause=cause,
                supplier_id=supplier_id,
                mappings=[MappingSpec(s_sku, sku, units) for s_sku, sku, units, _ in rows],
            )
        )
        writer.execute(
            ReportStock(
                at=at,
                cause=cause,
                supplier_id=supplier_id,
                delivery_id=f"demo-{at:%Y%m%dT%H%M%S%f}",
                content_hash=f"demo-{at.isoformat()}",
                source="demo",
                rows=len(rows),
                observations=[
                    Observation(index=i, supplier_sku=s_sku, quantity=level, observed_at=at)
                    for i, (s_sku, _, _, level) in enumerate(rows)
                ],
            )
        )


def demo_settings_banner(settings: Settings, url: str) -> str:
    lines = [f"Stockledger is serving on {url}  (OpenAPI: {url}/docs)", "API keys:"]
    lines += [
        f"  {key.role:<10} {key.name:<12} {key.secret.get_secret_value()}"
        for key in settings.api_keys
    ]
    auth = '-H "Authorization: Bearer demo-storefront-key"'
    lines.append(f"Try: curl {auth} {url}/v1/availability/WIDGET-BLUE")
    return "\n".join(lines)
