"""The demo that `make run` serves: five simulated suppliers feeding the ledger live.

- acme:     a REST API the ledger polls (paginated JSON with ETags),
- globex:   signed webhooks pushed to the ledger,
- initech:  CSV files dropped into a watched folder,
- umbrella: EDI X12 846 files pulled over SFTP,
- hooli:    XML files pulled over FTP.
Each reports a small catalogue whose quantities move every few seconds; one item of
each is left unmapped, so dead letters and conflicts have something to show.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import structlog

from api.settings import Settings
from connectors.simulator import (
    Catalogue,
    FtpSupplier,
    RestSupplier,
    SftpSupplier,
    client_key,
    drop,
    send_webhook,
    webhook_body,
)
from ledger.base import Cause
from ledger.commands import PutMappings, PutSupplier
from ledger.mapping import MappingSpec
from ledger.supplier import SupplierTerms
from ledger.writer import LedgerWriter

log = structlog.get_logger(__name__)

DEMO_KEYS = (
    "admin:admin:demo-admin-key,"
    "oms:oms:demo-oms-key,"
    "storefront:storefront:demo-storefront-key,"
    "auditor:auditor:demo-auditor-key,"
    "acme-feed:supplier:demo-acme-key:acme"
)

SKUS = ["WIDGET-BLUE", "WIDGET-RED", "GADGET-9", "GIZMO-1", "SPROCKET-3"]
WEBHOOK_SECRET_VARIABLE = "STOCKLEDGER_DEMO_WEBHOOK_SECRET"  # noqa: S105 - a variable name
SFTP_KEY_VARIABLE = "STOCKLEDGER_DEMO_SFTP_KEY"  # the private key of the SFTP login
FTP_PASSWORD_VARIABLE = "STOCKLEDGER_DEMO_FTP_PASSWORD"  # noqa: S105 - a variable name
# How long the suppliers wait for the service to answer before they deliver anyway.
START_WAIT_SECONDS = 60.0


@dataclass
class LiveSuppliers:
    """The simulated suppliers and the thread that moves their stock."""

    folder: Path
    interval_seconds: float = 5.0
    catalogues: dict[str, Catalogue] = field(default_factory=dict)
    rest: RestSupplier | None = None
    sftp: SftpSupplier | None = None
    ftp: FtpSupplier | None = None
    known_hosts: Path | None = None  # the SFTP server's host key, pinned
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> LiveSuppliers:
        now = datetime.now(UTC).replace(microsecond=0)
        for supplier, prefix in (
            ("acme", "ACME"),
            ("globex", "GLX"),
            ("initech", "INI"),
            ("umbrella", "UMB"),
            ("hooli", "HOOLI"),
        ):
            self.catalogues[supplier] = Catalogue(
                len(SKUS) + 1, seed=len(prefix), observed_at=now, prefix=prefix
            )
        os.environ.setdefault(WEBHOOK_SECRET_VARIABLE, secrets.token_hex(16))
        for name in ("initech", "umbrella", "hooli"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        self.rest = RestSupplier(self.catalogues["acme"], pagination="link", page_size=4).start()
        # The SFTP login as production should have it: a key, and the server's host key
        # pinned in a known_hosts file.
        private, public = client_key()
        os.environ[SFTP_KEY_VARIABLE] = private
        self.sftp = SftpSupplier(
            self.folder / "umbrella", username="demo", authorized_keys=[public]
        ).start()
        self.known_hosts = self.folder / "umbrella.known_hosts"
        self.known_hosts.write_text(self.sftp.known_hosts + "\n")
        os.environ.setdefault(FTP_PASSWORD_VARIABLE, secrets.token_hex(16))
        self.ftp = FtpSupplier(
            self.folder / "hooli", username="demo", password=os.environ[FTP_PASSWORD_VARIABLE]
        ).start()
        return self

    def connectors(self) -> dict[str, dict[str, Any]]:
        """Each supplier's connector settings, pointing at its simulator."""
        assert self.rest is not None
        assert self.sftp is not None
        assert self.ftp is not None
        assert self.known_hosts is not None
        every = {"schedule": {"interval_seconds": self.interval_seconds}, "units": {"CS": 12}}
        return {
            "acme": {
                **every,
                "poll": {
                    "url": f"{self.rest.base_url}/inventory",
                    "pagination": "link",
                    "page_size": 4,
                },
            },
            "globex": {**every, "webhook": {"secret_ref": f"env:{WEBHOOK_SECRET_VARIABLE}"}},
            "initech": {**every, "folder": {"path": str(self.folder / "initech"), "format": "csv"}},
            "umbrella": {
                **every,
                "sftp": {
                    "host": self.sftp.host,
                    "port": self.sftp.port,
                    "username": "demo",
                    "private_key_ref": f"env:{SFTP_KEY_VARIABLE}",
                    "path": "/",
                    "format": "edi846",
                    "known_hosts": str(self.known_hosts),
                },
            },
            "hooli": {
                **every,
                "ftp": {
                    "host": self.ftp.host,
                    "port": self.ftp.port,
                    "username": "demo",
                    "password_ref": f"env:{FTP_PASSWORD_VARIABLE}",
                    "path": "/",
                    "format": "xml",
                },
            },
        }

    def feed(self, base_url: str) -> None:
        """Moves every catalogue's stock and delivers it, every interval, until stopped."""
        self._thread = threading.Thread(
            target=self._feed, args=(base_url,), name="demo-suppliers", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for server in (self.rest, self.sftp, self.ftp):
            if server is not None:
                server.stop()

    def _feed(self, base_url: str) -> None:
        with httpx.Client(timeout=10) as client:
            if not self._answering(base_url, client):
                return
            while True:
                try:
                    self._deliver(base_url, client)
                except (httpx.HTTPError, OSError) as error:
                    log.warning("demo.delivery_failed", error=str(error))
                if self._stop.wait(self.interval_seconds):
                    return
                for catalogue in self.catalogues.values():
                    catalogue.advance(0.4)

    def _answering(self, base_url: str, client: httpx.Client) -> bool:
        """Waits until the service answers (it starts after the suppliers), so that the
        first webhook is not refused for want of a listener; False if stopped first."""
        deadline = time.monotonic() + START_WAIT_SECONDS
        while not self._stop.is_set():
            try:
                if client.get(f"{base_url}/healthz").status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                log.warning("demo.service_not_answering", seconds=START_WAIT_SECONDS)
                return True  # deliver anyway: each failure is logged
            self._stop.wait(0.2)
        return False

    def _deliver(self, base_url: str, client: httpx.Client) -> None:
        delivery = uuid.uuid4().hex
        body = webhook_body(self.catalogues["globex"].items(), delivery)
        send_webhook(
            f"{base_url}/v1/suppliers/globex/webhook",
            "globex",
            os.environ[WEBHOOK_SECRET_VARIABLE],
            body,
            delivery,
            client=client,
        )
        drop(self.folder / "initech", "csv", self.catalogues["initech"].items())
        drop(self.folder / "umbrella", "edi846", self.catalogues["umbrella"].items())
        drop(self.folder / "hooli", "xml", self.catalogues["hooli"].items())


SUPPLIERS = {
    "acme": SupplierTerms(
        name="Acme Supply",
        priority=1,
        lead_time_days=2,
        buffer=2,
        stale_after_seconds=300,
        exclude_after_seconds=3600,
    ),
    "globex": SupplierTerms(
        name="Globex Wholesale",
        priority=2,
        lead_time_days=1,
        stale_after_seconds=300,
        exclude_after_seconds=3600,
        reports_net_of_our_orders=True,
    ),
    "initech": SupplierTerms(
        name="Initech Dropship",
        priority=3,
        lead_time_days=5,
        stale_after_seconds=300,
        exclude_after_seconds=3600,
        timezone="Europe/Berlin",
    ),
    "umbrella": SupplierTerms(
        name="Umbrella Distribution",
        priority=4,
        lead_time_days=3,
        stale_after_seconds=300,
        exclude_after_seconds=3600,
    ),
    "hooli": SupplierTerms(
        name="Hooli Parts",
        priority=5,
        lead_time_days=4,
        stale_after_seconds=300,
        exclude_after_seconds=3600,
    ),
}


def seed_demo(writer: LedgerWriter, live: LiveSuppliers) -> None:
    """Suppliers with their connectors, and mappings of all but one item of each catalogue.

    Idempotent: both are upserts.
    """
    at = datetime.now(UTC)
    cause = Cause("demo", "demo.seed", uuid.uuid4().hex)
    connectors = live.connectors()
    for supplier_id, terms in SUPPLIERS.items():
        configured = SupplierTerms(**{**terms.as_dict(), "connector": connectors[supplier_id]})
        writer.execute(PutSupplier(at=at, cause=cause, supplier_id=supplier_id, terms=configured))
        items = list(live.catalogues[supplier_id].items())[: len(SKUS)]
        mappings = [
            MappingSpec(item.supplier_sku, sku, item.units_per_supplier_unit, item.upc)
            for item, sku in zip(items, SKUS, strict=True)
        ]
        writer.execute(PutMappings(at=at, cause=cause, supplier_id=supplier_id, mappings=mappings))


def demo_settings_banner(settings: Settings, url: str) -> str:
    lines = [f"Stockledger is serving on {url}  (OpenAPI: {url}/docs)", "API keys:"]
    lines.append(f"  {'role':<10} {'name':<12} {'secret (Authorization: Bearer …)':<34} supplier")
    lines += [
        f"  {key.role:<10} {key.name:<12} {key.secret.get_secret_value():<34}"
        f" {key.supplier_id or ''}".rstrip()
        for key in settings.api_keys
    ]
    lines.append(
        "Five simulated suppliers (REST, webhook, CSV drop folder, EDI over SFTP, XML over FTP)"
        " feed it live."
    )
    auth = '-H "Authorization: Bearer demo-storefront-key"'
    lines.append(f"Try: curl {auth} {url}/v1/availability/WIDGET-BLUE")
    return "\n".join(lines)
