"""The banner `ledger serve --demo` prints: its keys, with what each may act for."""

from __future__ import annotations

import pytest

from api.demo import DEMO_KEYS, demo_settings_banner
from api.settings import Settings


def test_the_banner_lists_each_key_under_a_header_with_the_supplier_it_speaks_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A newcomer's walkthrough: `supplier acme-feed demo-acme-key` said neither what the
    columns were nor that the key was acme's."""
    monkeypatch.setenv("LEDGER_API_KEYS", DEMO_KEYS)

    lines = demo_settings_banner(Settings(), "http://127.0.0.1:8000").splitlines()

    header = lines.index("API keys:") + 1
    assert lines[header].split()[:3] == ["role", "name", "secret"]
    assert lines[header].rstrip().endswith("supplier")
    rows = [line.split() for line in lines[header + 1 : header + 6]]
    assert rows == [
        ["admin", "admin", "demo-admin-key"],
        ["oms", "oms", "demo-oms-key"],
        ["storefront", "storefront", "demo-storefront-key"],
        ["auditor", "auditor", "demo-auditor-key"],
        ["supplier", "acme-feed", "demo-acme-key", "acme"],
    ]
