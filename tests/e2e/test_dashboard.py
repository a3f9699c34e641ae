"""The operators' Grafana dashboard (ops/grafana/stockledger.json) against a running server:
every metric a panel queries is one `GET /metrics` really exports, read the way its type asks."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, serving
from tests.e2e.test_reservation_lifecycle import new_supplier, ok, reserve, stocked_sku

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "stockledger.json"
DATASOURCE = "${DS_PROMETHEUS}"

# Words of PromQL that look like names but are not metrics.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
KEYWORDS |= {"unless", "offset", "inf", "nan"}
# Label lists (`by (supplier)`), label matchers, ranges and strings hold label names, label
# values and Grafana variables, never metric names: they are cut out before names are read.
LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
MATCHERS = re.compile(r"\{[^}]*\}")
RANGES = re.compile(r"\[[^\]]*\]")
STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
NAME = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?")
LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")
# Counters and histograms only mean something as a rate: a raw count restarts at each restart.
RATES = ("rate", "irate", "increase")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads, as the series are named when scraped
    (`_total`, `_bucket`, `_sum`, `_count` kept: that is the name a query must use)."""
    bare = STRINGS.sub("", expr)
    bare = LABEL_LISTS.sub("", MATCHERS.sub("", RANGES.sub("", bare)))
    return {
        name
        for name, call in NAME.findall(bare)
        if not call and name.lower() not in KEYWORDS and not name.startswith("__")
    }


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside a collapsed row too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expression) for each panel's targets."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def variable_metrics(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query["query"] if isinstance(query, dict) else str(query or "")
        for name in LABEL_VALUES.findall(text):
            yield f"variable {variable['name']}", name


def served_names(dashboard: dict[str, Any]) -> set[str]:
    return {name for _, expr in queries(dashboard) for name in metric_names(expr)}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def finished_upload(admin: httpx.Client, supplier_id: str, delivery_id: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        status = ok(admin.get(f"/v1/feeds/{delivery_id}", params={"supplier_id": supplier_id}))
        if status["status"] in {"applied", "rejected", "failed"}:
            return
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


@pytest.fixture(scope="module")
def scraped(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """What `GET /metrics` of a busy `ledger serve --workers 2` answers.

    A little of everything first: some series (per supplier, per refusal code, dead letters)
    only appear once something happened."""
    with serving(postgres_server_url, tmp_path_factory.mktemp("dashboard")) as server:
        drive_traffic(server)
        # The server answers once one worker is up; the other may still be starting its
        # parts (a fresh-clone run scraped one of each). Scraped until both run, or 30 s.
        deadline = time.monotonic() + 30
        while True:
            answer = httpx.get(f"{server.base_url}/metrics", timeout=10)
            assert answer.status_code == 200, answer.text
            running = processes(answer.text)
            both = all(running.get(part) == 2 for part in ("api", "projections", "connectors"))
            if both or time.monotonic() > deadline:
                return answer.text
            time.sleep(0.2)


def processes(scraped: str) -> dict[str, float]:
    """`ledger_processes` by part, as scraped."""
    return {
        sample.labels["part"]: sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
        if sample.name == "ledger_processes"
    }


@pytest.fixture(scope="module")
def exported(scraped: str) -> dict[str, str]:
    """Each series name the server exports, with the type of its family."""
    return {
        sample.name: family.type
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
    }


def test_the_server_s_processes_are_counted_by_the_part_they_run(scraped: str) -> None:
    """Each of the two workers runs the API, the projections and the connectors (as `serve`
    does by default), and one of them sweeps."""
    assert processes(scraped) == {"api": 2, "projections": 2, "connectors": 2, "sweeper": 1}


def drive_traffic(server: Server) -> None:
    with server.client("test-admin") as admin, server.client("test-oms") as oms:
        supplier_id = new_supplier(admin)
        sku = stocked_sku(admin, {supplier_id: 3})
        ok(reserve(oms, (sku, 1)), 201)
        ok(reserve(oms, (sku, 50)), 409)  # insufficient stock
        at = datetime.now(UTC).isoformat()
        # One row unmapped, so that a dead letter is open for the supplier.
        body = f"sku;quantity;observed_at\r\n{supplier_id}:{sku};5;{at}\r\nNOPE;1;{at}\r\n"
        accepted = admin.post(
            f"/v1/suppliers/{supplier_id}/feeds", params={"format": "csv"}, content=body.encode()
        )
        finished_upload(admin, supplier_id, ok(accepted, 202)["delivery_id"])


def test_metric_names_are_read_out_of_promql_without_functions_labels_or_ranges() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le)"
        ' (rate(a_bucket{job=~"$job", x="b c"}[$__rate_interval])))'
        " / on (job) group_left (supplier) max without (instance) (b_total offset 5m)"
        " - time() + c:recorded"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c:recorded"}


def test_the_dashboard_imports_into_any_grafana_with_a_prometheus_datasource(
    dashboard: dict[str, Any],
) -> None:
    every = list(panels(dashboard))
    ids = [panel["id"] for panel in every]
    inputs = {(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]}
    assert ("DS_PROMETHEUS", "datasource", "prometheus") in inputs
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["title"]
    assert dashboard["uid"]
    assert len(ids) == len(set(ids)), ids
    for panel in every:
        assert panel.get("title"), panel["id"]
        assert set(panel["gridPos"]) >= {"x", "y", "w", "h"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE, variable["name"]


def test_no_two_panels_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        place = panel["gridPos"]
        for x in range(place["x"], place["x"] + place["w"]):
            for y in range(place["y"], place["y"] + place["h"]):
                assert (x, y) not in cells, (panel["title"], cells[(x, y)])
                cells[(x, y)] = panel["title"]


def test_the_writer_the_projections_and_the_feeds_each_have_panels(
    dashboard: dict[str, Any],
) -> None:
    rows = {panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"}
    names = served_names(dashboard)
    assert {"Writer", "Projections", "Feeds"} <= rows
    for family in ("ledger_writer_", "ledger_commands_", "ledger_projection_", "ledger_feed_"):
        assert any(name.startswith(family) for name in names), family


def test_every_metric_the_dashboard_queries_is_one_the_server_exports(
    dashboard: dict[str, Any], exported: dict[str, str]
) -> None:
    used = [(where, name) for where, expr in queries(dashboard) for name in metric_names(expr)]
    used += list(variable_metrics(dashboard))
    missing = sorted({(where, name) for where, name in used if name not in exported})
    assert used
    assert not missing, f"not exported by GET /metrics: {missing}"


def test_counters_and_histograms_are_read_as_rates_and_gauges_never_are(
    dashboard: dict[str, Any], exported: dict[str, str]
) -> None:
    for where, expr in queries(dashboard):
        # Names not exported at all are the test above's to report.
        for name in metric_names(expr) & exported.keys():
            rated = re.findall(rf"\b(\w+)\(\s*{re.escape(name)}\b", expr)
            if exported[name] in {"counter", "histogram"}:
                assert rated, (where, name)
                assert set(rated) <= set(RATES), (where, name, rated)
            else:
                assert not set(rated) & set(RATES), (where, name, rated)
