"""The shipped Grafana dashboard and Prometheus config against what pdserve really exports."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess

import httpx
import pytest
import yaml

from cluster.config import SLOConfig
from router.metrics import Metrics
from tests.observability.support import (
    REPO_ROOT,
    Scrape,
    completion,
    deployment_with_dashboard,
    num_judged,
    serving,
    wait_ready,
    wait_until,
)

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "pdserve-goodput.json"
PROMETHEUS_YML = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROVISIONING = REPO_ROOT / "deploy" / "grafana" / "provisioning"
METRIC_NAME = re.compile(r"\bpdserve_[A-Za-z0-9_:]*")
# Sample-name suffixes Prometheus stores for each family type (prometheus-client's rules:
# a Counter `x` is exposed as `x_total`; a Histogram `x` as `x_bucket`, `x_sum`, `x_count`).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for p in dashboard["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))  # panels inside collapsed rows
    return panels


def panel_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]


def promql_exprs(dashboard: dict) -> list[str]:
    """Panel queries plus template-variable queries (Grafana's `label_values(metric, label)`)."""
    exprs = panel_exprs(dashboard)
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def referenced_names(dashboard: dict) -> set[str]:
    return {name for expr in promql_exprs(dashboard) for name in METRIC_NAME.findall(expr)}


def family_of(sample_name: str, families: dict[str, str]) -> str | None:
    """The family a stored series name belongs to, honouring the family's type."""
    for family, kind in families.items():
        if any(sample_name == family + suffix for suffix in SUFFIXES.get(kind, ())):
            return family
    return None


def test_every_expression_names_a_real_series_of_the_right_type():
    families = {f.name: f.type for f in Metrics(SLOConfig(), num_units=1).registry.collect()}
    names = referenced_names(load_dashboard())
    assert len(names) >= 20
    unknown = sorted(n for n in names if family_of(n, families) is None)
    # e.g. `pdserve_slo_met` (a Counter without `_total`) or `pdserve_goodput..._bucket`.
    assert not unknown, f"not a series pdserve exports (check the suffix): {unknown}"
    # The brief's must-haves are all on the dashboard.
    for needed in ("pdserve_goodput_requests_per_second", "pdserve_slo_attainment_ratio",
                   "pdserve_slo_met_total", "pdserve_slo_requests_total",
                   "pdserve_request_ttft_seconds_bucket", "pdserve_request_tpot_seconds_bucket",
                   "pdserve_slo_target_seconds", "pdserve_kv_transfer_bytes_total",
                   "pdserve_kv_transfers_total", "pdserve_requests_served_total",
                   "pdserve_instance_waiting_requests", "pdserve_instance_kv_cache_usage_ratio"):
        assert needed in names


async def test_every_referenced_metric_is_exported_by_a_running_router():
    app, deps, prefills, decodes = deployment_with_dashboard()
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        await wait_ready(client)
        bodies = [completion([11, 12, 13], 4) for _ in range(3)] + [completion([11, 12], 1)]
        for body in bodies:
            assert (await client.post("/v1/completions", json=body)).status_code == 200
        decodes[0].lose_kv = True  # one recompute on decode
        assert (await client.post("/v1/completions", json=completion([11, 12, 13], 4))).status_code == 200
        await wait_until(lambda: num_judged(deps) == 5, what="5 judged requests")

        async def scraped() -> Scrape:
            return Scrape((await client.get("/metrics")).text)

        m = await scraped()
        for _ in range(200):  # transfers arrive with the next stats poll (every 50 ms)
            if m.sum("pdserve_kv_transfers_total", outcome="failed") >= 1:
                break
            await asyncio.sleep(0.02)
            m = await scraped()

    exported = m.sample_names
    missing = sorted(referenced_names(load_dashboard()) - exported)
    assert not missing, f"the Grafana dashboard queries series /metrics does not export: {missing}"
    assert m.value("pdserve_requests_served_total", served_by="recomputed") == 1
    assert m.value("pdserve_requests_served_total", served_by="transferred") == 3
    assert m.value("pdserve_requests_served_total", served_by="prefill_only") == 1


def test_dashboard_model_is_importable_and_provisionable():
    d = load_dashboard()
    assert d["uid"] == "pdserve-goodput" and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = all_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert t["expr"].strip() and t["refId"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("goodput", "attainment", "time to first token", "time per output token",
                  "kv-cache usage", "bandwidth", "served by"):
        assert topic in titles


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (apt-get install -y prometheus)")
def test_promtool_accepts_every_expression_and_the_scrape_config(tmp_path):
    # Panel queries only: `label_values(...)` in the variables is Grafana's, not PromQL.
    exprs = [e.replace("$job", ".*") for e in panel_exprs(load_dashboard())]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"pdserve:dashboard_expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    checked = subprocess.run(["promtool", "check", "rules", str(rules_file)],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_scrape_config_and_provisioning_point_at_the_router_and_dashboard():
    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    [job] = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert "honor_labels" not in job  # workers are named by `instance_id`, no clash
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "pdserve.yaml").read_text())
    [ds] = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "pdserve.yaml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_docs_list_every_metric():
    doc = (REPO_ROOT / "docs" / "observability.md").read_text()
    for family in Metrics(SLOConfig(), num_units=1).registry.collect():
        series = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{series}`" in doc, f"docs/observability.md does not list {series}"
