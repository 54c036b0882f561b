"""Static checks of the deployment files: Prometheus config, rules and rule tests
(with promtool), the Grafana dashboard and provisioning, docker-compose.yml and
the Dockerfile.

Only the promtool-based tests need Debian's `promtool`; they are skipped, with a
reason, when it is not installed. Nothing here needs Docker, Grafana or network.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from string import Template
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROM = DEPLOY / "prometheus"
RULES = PROM / "rules"
RULE_FILES = [RULES / "recording.yml", RULES / "alerts.yml"]
RULE_TESTS = [PROM / "tests" / "alerts_test.yml", PROM / "tests" / "recording_test.yml"]
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sensor-anomaly.json"
COMPOSE = REPO / "docker-compose.yml"

JOB = "sensor-anomaly-worker"
DATASOURCE_UID = "${datasource}"  # the dashboard's datasource variable
RUNBOOK = REPO / "docs" / "runbook.md"

EXPECTED_ALERTS = {
    "SensorAnomalyWorkerDown",
    "SensorAnomalyConsumerLagGrowing",
    "SensorAnomalyAnomalyRateSpike",
    "SensorAnomalyDeadLettersRising",
    "SensorAnomalyNoData",
    "SensorAnomalyModelStale",
    "SensorAnomalyWorkerNotReady",
    "SensorAnomalyInputOutOfTrainingRange",
    "SensorAnomalyAboveThresholdDrift",
    "SensorAnomalyCriticalIncidentsOpen",
}

# The worker's metric contract; histograms also expose _bucket/_sum/_count.
COUNTERS = {
    "sensor_anomaly_readings_consumed_total",
    "sensor_anomaly_readings_scored_total",
    "sensor_anomaly_anomalies_total",
    "sensor_anomaly_dead_letters_total",
    "sensor_anomaly_batches_total",
    "sensor_anomaly_kafka_errors_total",
    "sensor_anomaly_rebalances_total",
    "sensor_anomaly_model_reloads_total",
    "sensor_anomaly_drift_readings_total",
    "sensor_anomaly_drift_out_of_range_readings_total",
    "sensor_anomaly_drift_above_threshold_readings_total",
    "sensor_anomaly_readings_warming_up_total",
    "sensor_anomaly_readings_replayed_total",
    "sensor_anomaly_incidents_opened_total",
    "sensor_anomaly_incidents_resolved_total",
}
HISTOGRAMS = {
    "sensor_anomaly_batch_size_readings",
    "sensor_anomaly_scoring_duration_seconds",
    "sensor_anomaly_end_to_end_latency_seconds",
    "sensor_anomaly_score_ratio",
    "sensor_anomaly_incident_duration_seconds",
}
GAUGES = {
    "sensor_anomaly_threshold",
    "sensor_anomaly_model_info",
    "sensor_anomaly_model_trained_timestamp_seconds",
    "sensor_anomaly_consumer_lag_messages",
    "sensor_anomaly_last_batch_timestamp_seconds",
    "sensor_anomaly_ready",
    "sensor_anomaly_drift_expected_above_threshold_ratio",
    "sensor_anomaly_drift_score_ratio_psi",
    "sensor_anomaly_incidents_open",
}
KNOWN_METRICS = (
    COUNTERS
    | GAUGES
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
METRIC_TOKEN = re.compile(r"\bsensor_anomaly_[a-z0-9_]+\b")
RECORDING_NAME = re.compile(r"^sensor_anomaly:[a-z0-9_]+:[a-z0-9_]+$")


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rules() -> list[dict[str, Any]]:
    return [rule for f in RULE_FILES for g in _load_yaml(f)["groups"] for rule in g["rules"]]


def _alert_rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


def _recording_rules() -> dict[str, dict[str, Any]]:
    return {r["record"]: r for r in _rules() if "record" in r}


def _dashboard_queries_module() -> ModuleType:
    # Loaded by path: `tests` is not a package and a third-party `tests` may be installed.
    path = REPO / "tests" / "support" / "dashboard_queries.py"
    spec = importlib.util.spec_from_file_location("_dashboard_queries", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels") or [])


def _compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


# ------------------------------------------------------------------ promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    return path


def _run(cmd: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def _assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"


def test_promtool_check_config_compose(promtool: str) -> None:
    # rule_files are relative to prometheus.yml, so the repo layout is checked as is
    _assert_ok(_run([promtool, "check", "config", str(PROM / "prometheus.yml")]))


def test_promtool_check_config_local_template(promtool: str, tmp_path: Path) -> None:
    template = (PROM / "local.yml.tmpl").read_text(encoding="utf-8")
    rendered = Template(template).substitute(WORKER_TARGET="127.0.0.1:9108", RULES_DIR=str(RULES))
    config = tmp_path / "prometheus.yml"
    config.write_text(rendered, encoding="utf-8")
    _assert_ok(_run([promtool, "check", "config", str(config)]))
    data = yaml.safe_load(rendered)
    assert data["global"]["scrape_interval"] == "1s"
    jobs = {job["job_name"]: job for job in data["scrape_configs"]}
    assert jobs[JOB]["static_configs"][0]["targets"] == ["127.0.0.1:9108"]


def test_promtool_check_rules(promtool: str) -> None:
    _assert_ok(_run([promtool, "check", "rules", *map(str, RULE_FILES)]))


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_test_rules(promtool: str, test_file: Path) -> None:
    _assert_ok(_run([promtool, "test", "rules", str(test_file)]))


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    # promtool has no "check expr": wrap every query in a recording rule instead.
    queries = _dashboard_queries_module().dashboard_queries(DASHBOARD)
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": q} for i, (_, q) in enumerate(queries)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _assert_ok(_run([promtool, "check", "rules", str(path)]))


# -------------------------------------------------------- rules (structure)


def test_prometheus_config_finds_workers_by_dns() -> None:
    # `docker compose up --scale worker=N`: one A record per replica of the service, so
    # the scrape config names the compose service, never a fixed list of containers.
    config = _load_yaml(PROM / "prometheus.yml")
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = _compose()["services"]
    for job, service, port in [
        (JOB, "worker", 9108),
        ("sensor-anomaly-serve", "anomaly-serve", 8080),
    ]:
        assert "static_configs" not in jobs[job], job
        (sd,) = jobs[job]["dns_sd_configs"]
        assert sd["names"] == [service] and sd["type"] == "A" and sd["port"] == port
        assert service in services, f"{job} discovers a service compose does not define"
    assert sorted(config["rule_files"]) == ["rules/alerts.yml", "rules/recording.yml"]


def test_expected_alerts_are_defined_and_documented() -> None:
    alerts = _alert_rules()
    assert set(alerts) == EXPECTED_ALERTS
    for name, rule in alerts.items():
        assert rule.get("for"), f"{name}: needs a `for:` so it does not flap"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert "Runbook:" in annotations["description"], f"{name}: no runbook hint"


def test_recording_rule_names() -> None:
    names = list(_recording_rules())
    assert len(names) == len(set(names))
    for name in names:
        assert RECORDING_NAME.match(name), name


def test_rules_reference_only_contract_metrics() -> None:
    recorded = set(_recording_rules())
    for rule in _rules():
        for token in METRIC_TOKEN.findall(rule["expr"]):
            assert token in KNOWN_METRICS, f"unknown metric {token} in {rule}"
        for token in re.findall(r"\bsensor_anomaly:[a-z0-9_:]+", rule["expr"]):
            assert token in recorded, f"unknown recording rule {token}"


def test_every_alert_has_firing_and_silent_cases() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for group in _load_yaml(PROM / "tests" / "alerts_test.yml")["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    assert firing >= EXPECTED_ALERTS, f"never seen firing: {EXPECTED_ALERTS - firing}"
    assert silent >= EXPECTED_ALERTS, f"never seen silent: {EXPECTED_ALERTS - silent}"


def test_every_recording_rule_is_tested() -> None:
    tested = {
        case["expr"].strip()
        for group in _load_yaml(PROM / "tests" / "recording_test.yml")["tests"]
        for case in group.get("promql_expr_test", [])
    }
    missing = set(_recording_rules()) - tested
    assert not missing, f"recording rules without a promql_expr_test: {sorted(missing)}"


# ------------------------------------------------------------------ grafana


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "sensor-anomaly"
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(_all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    content = [p for p in panels if p["type"] != "row"]
    assert {p["type"] for p in content} >= {"timeseries", "stat", "heatmap"}
    for panel in content:
        title = panel.get("title")
        assert title, f"panel {panel['id']} has no title"
        assert panel.get("description"), f"{title}: no description"
        assert panel["datasource"]["uid"] == DATASOURCE_UID, title
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title
        targets = panel.get("targets") or []
        assert targets, f"{title}: no targets"
        for target in targets:
            assert target.get("expr", "").strip(), f"{title}: empty expr"
            assert target["datasource"]["uid"] == DATASOURCE_UID, title
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), title


def test_dashboard_covers_the_essentials() -> None:
    exprs = "\n".join(
        t["expr"] for p in _all_panels(_dashboard()["panels"]) for t in p.get("targets", [])
    )
    for metric in [
        "sensor_anomaly_readings_consumed_total",
        "sensor_anomaly_readings_scored_total",
        "sensor_anomaly_anomalies_total",
        "sensor_anomaly_score_ratio_bucket",
        "sensor_anomaly_end_to_end_latency_seconds_bucket",
        "sensor_anomaly_scoring_duration_seconds_bucket",
        "sensor_anomaly_consumer_lag_messages",
        "sensor_anomaly_dead_letters_total",
        "sensor_anomaly_model_info",
        "sensor_anomaly_model_trained_timestamp_seconds",
        "sensor_anomaly_ready",
        "up{",
    ]:
        assert metric in exprs, f"dashboard never queries {metric}"
    for token in METRIC_TOKEN.findall(exprs):
        assert token in KNOWN_METRICS, f"dashboard queries unknown metric {token}"
    heatmaps = [p for p in _all_panels(_dashboard()["panels"]) if p["type"] == "heatmap"]
    assert any(t.get("format") == "heatmap" for p in heatmaps for t in p["targets"])


def test_dashboard_rates_use_rate_interval() -> None:
    for panel in _all_panels(_dashboard()["panels"]):
        for target in panel.get("targets", []):
            for window in re.findall(r"\b(?:rate|increase)\([^\[]*\[([^\]]+)\]", target["expr"]):
                assert window in {"$__rate_interval", "$__range"}, (panel["title"], window)


def test_dashboard_queries_helper() -> None:
    queries = _dashboard_queries_module().dashboard_queries(DASHBOARD)
    n_targets = sum(len(p.get("targets", [])) for p in _all_panels(_dashboard()["panels"]))
    assert len(queries) == n_targets
    for title, query in queries:
        assert title
        assert "$" not in query and "[[" not in query, (title, query)
    all_queries = "\n".join(q for _, q in queries)
    assert "[30s]" in all_queries
    assert f'job=~"{JOB}"' in all_queries
    assert 'instance=~".+"' in all_queries


def test_dashboard_queries_substitution_and_rows(tmp_path: Path) -> None:
    module = _dashboard_queries_module()
    nested_expr = 'rate(x{job="$job",i=~"${inst}",dc=~"[[dc]]"}[$__rate_interval])'
    dashboard: dict[str, Any] = {
        "templating": {
            "list": [
                {"name": "job", "type": "query", "current": {"value": "svc"}},
                {
                    "name": "inst",
                    "type": "query",
                    "includeAll": True,
                    "current": {"value": ["$__all"]},
                },
                {"name": "dc", "type": "custom", "current": {"value": ["a", "b"]}},
                {"name": "ds", "type": "datasource", "current": {"value": "x"}},
            ]
        },
        "panels": [
            {
                "type": "row",
                "title": "collapsed",
                "collapsed": True,
                "panels": [
                    {
                        "title": "nested",
                        "targets": [{"expr": nested_expr}],
                    },
                ],
            },
            {
                "title": "top",
                "targets": [{"expr": "increase(y[$__range]) / $__interval_ms"}, {"expr": ""}],
            },
        ],
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dashboard))
    assert module.dashboard_queries(path) == [
        ("nested", 'rate(x{job="svc",i=~".+",dc=~"(a|b)"}[30s])'),
        ("top", "increase(y[5m]) / 15000"),
    ]
    dashboard["panels"] = [{"title": "bad", "targets": [{"expr": 'up{x="$nope"}'}]}]
    path.write_text(json.dumps(dashboard))
    with pytest.raises(KeyError):
        module.dashboard_queries(path)


# Grafana dashboard-linter rules (grafana/dashboard-linter; the tool itself is not
# installable here), applied with a real PromQL parser, honouring the .lint exclusions.
LINT_PANEL_TYPES = {"stat", "singlestat", "graph", "table", "timeseries", "gauge"}
RATE_FUNCTIONS = {"rate", "irate", "increase"}
RATE_SENTINEL = timedelta(seconds=7777)  # stands in for $__rate_interval while parsing


def _lint_exclusions() -> dict[str, set[str]]:
    data = _load_yaml(DASHBOARD.parent / ".lint") or {}
    return {
        rule: {entry["panel"] for entry in (spec or {}).get("entries", [])}
        for rule, spec in (data.get("exclusions") or {}).items()
    }


def _promql_nodes(node: Any) -> Iterator[Any]:
    import promql_parser as pp

    yield node
    children: list[Any] = []
    if isinstance(node, pp.BinaryExpr):
        children = [node.lhs, node.rhs]
    elif isinstance(node, pp.AggregateExpr):
        children = [node.expr] + ([node.param] if node.param is not None else [])
    elif isinstance(node, pp.Call):
        children = list(node.args)
    elif isinstance(node, pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr):
        children = [node.expr]
    elif isinstance(node, pp.MatrixSelector):
        children = [node.vector_selector]
    for child in children:
        yield from _promql_nodes(child)


def _parse_grafana_promql(expr: str) -> Any:
    try:
        import promql_parser as pp
    except ImportError:  # pragma: no cover - a [dev] install has it
        pytest.fail("promql-parser missing: pip install -e '.[dev]' (make install)")
    text = expr.replace("$__rate_interval", f"{RATE_SENTINEL.seconds}s")
    for macro, value in [("$__range", "5m"), ("$__interval", "15s")]:
        text = text.replace(macro, value)
    return pp.parse(text)


def _lint_templates(dashboard: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasources = [v for v in variables.values() if v["type"] == "datasource"]
    if [(v["name"], v.get("label"), v.get("query")) for v in datasources] != [
        ("datasource", "Data Source", "prometheus")
    ]:
        problems.append("template-datasource-rule: one variable `datasource` (Data Source)")
    for name in ("job", "instance"):
        v = variables.get(name) or {}
        ok = (
            v.get("type") == "query"
            and v.get("label") == name
            and v.get("datasource", {}).get("uid") in {"$datasource", "${datasource}"}
            and v.get("multi") is True
            and v.get("allValue") == ".+"
        )
        if not ok:
            problems.append(
                f"template-{name}-rule: `{name}` must be a multi-select query of "
                f"$datasource labelled `{name}` with allValue .+"
            )
    return problems


def _lint_target(title: str, expr: str, rate_excluded: bool) -> list[str]:
    import promql_parser as pp

    try:
        tree = _parse_grafana_promql(expr)
    except Exception as e:
        return [f"target-promql-rule: {title}: {e}"]
    problems: list[str] = []
    for node in _promql_nodes(tree):
        if isinstance(node, pp.VectorSelector):
            names = {(m.name, m.value) for m in node.matchers.matchers}
            if ("job", "$job") not in names:
                problems.append(f"target-job-rule: {title}: {node.name}")
            if ("instance", "$instance") not in names:
                problems.append(f"target-instance-rule: {title}: {node.name}")
        elif isinstance(node, pp.Call) and node.func.name in RATE_FUNCTIONS and not rate_excluded:
            ranges = [a.range for a in node.args if isinstance(a, pp.MatrixSelector)]
            if any(r != RATE_SENTINEL for r in ranges):
                problems.append(f"target-rate-interval-rule: {title}: {node}")
    return problems


def _lint_dashboard(dashboard: dict[str, Any]) -> list[str]:
    """Problems the dashboard-linter's rules would report (template-*, panel-*, target-*)."""
    problems = _lint_templates(dashboard)
    rate_excluded = _lint_exclusions().get("target-rate-interval-rule", set())
    for panel in _all_panels(dashboard["panels"]):
        title = panel.get("title", "")
        if panel["type"] == "row":
            continue
        if panel["type"] in LINT_PANEL_TYPES:
            if panel.get("datasource", {}).get("uid") not in {"$datasource", "${datasource}"}:
                problems.append(f"panel-datasource-rule: {title}")
            defaults = panel.get("fieldConfig", {}).get("defaults", {})
            if not defaults.get("unit") and not defaults.get("mappings"):
                problems.append(f"panel-units-rule: {title}")
        if not panel.get("description"):
            problems.append(f"panel-title-description-rule: {title}")
        for target in panel.get("targets", []):
            problems += _lint_target(title, target["expr"], title in rate_excluded)
    return problems


def test_dashboard_passes_the_dashboard_linter_rules() -> None:
    problems = _lint_dashboard(_dashboard())
    assert not problems, "\n".join(problems)


def test_dashboard_linter_rules_can_fail() -> None:
    # Each rule must be able to say no: break one thing per rule and expect its report.
    broken = _dashboard()
    panels = [p for p in _all_panels(broken["panels"]) if p["type"] == "timeseries"]
    panels[0]["datasource"] = {"type": "prometheus", "uid": "prometheus"}
    panels[1]["targets"][0]["expr"] = 'rate(sensor_anomaly_batches_total{job=~"$job"}[5m])'
    broken["templating"]["list"] = [
        v for v in broken["templating"]["list"] if v["type"] != "datasource"
    ]
    problems = "\n".join(_lint_dashboard(broken))
    for rule in (
        "template-datasource-rule",
        "panel-datasource-rule",
        "target-instance-rule",
        "target-rate-interval-rule",
    ):
        assert rule in problems, rule


def test_dashboard_imports_into_any_grafana() -> None:
    dashboard = _dashboard()
    (ds_input,) = dashboard["__inputs"]
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == "${" + ds_input["name"] + "}"
    required = {r["id"] for r in dashboard["__requires"]}
    used = {p["type"] for p in _all_panels(dashboard["panels"]) if p["type"] != "row"}
    assert used <= required, used - required
    # Nothing may point at a fixed datasource uid any more.
    text = json.dumps(dashboard)
    assert '"uid": "prometheus"' not in text


def test_dashboard_resources_row() -> None:
    panels = list(_all_panels(_dashboard()["panels"]))
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert "Resources" in rows
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for metric in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ):
        assert metric in exprs, metric


def test_dashboard_links_to_the_runbook() -> None:
    dashboard = _dashboard()
    urls = [link["url"] for link in dashboard["links"]]
    assert any(u.endswith("/docs/runbook.md") for u in urls), urls
    anchors = _runbook_anchors()
    for panel in _all_panels(dashboard["panels"]):
        for link in panel.get("links", []):
            if "runbook.md#" in link["url"]:
                assert link["url"].split("#")[1] in anchors, (panel["title"], link["url"])


def _runbook_anchors() -> dict[str, str]:
    """GitHub-style anchors of the runbook's second-level headings -> heading text."""
    headings = re.findall(r"^## (.+)$", RUNBOOK.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-"): h for h in headings}


def test_runbook_has_one_section_per_alert_and_alerts_link_to_it() -> None:
    alerts = _alert_rules()
    anchors = _runbook_anchors()
    assert set(anchors.values()) == set(alerts), (
        f"runbook sections without an alert: {set(anchors.values()) - set(alerts)}; "
        f"alerts without a section: {set(alerts) - set(anchors.values())}"
    )
    for name, rule in alerts.items():
        url = rule["annotations"].get("runbook_url", "")
        assert url == f"docs/runbook.md#{name.lower()}", f"{name}: runbook_url {url!r}"
        assert url.split("#")[1] in anchors


def test_grafana_provisioning() -> None:
    datasources = _load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (ds,) = datasources["datasources"]
    # The dashboard's datasource variable picks it (the only, default Prometheus).
    assert ds["uid"] == "prometheus" and ds["isDefault"] is True
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    providers = _load_yaml(DEPLOY / "grafana/provisioning/dashboards/dashboards.yml")
    (provider,) = providers["providers"]
    grafana = _compose()["services"]["grafana"]
    targets = {v.split(":")[1] for v in grafana["volumes"]}
    assert provider["options"]["path"] in targets, "dashboards path is not mounted"


# ------------------------------------------------------------------- compose


def _uid(user: str) -> str:
    return str(user).split(":")[0]


def test_compose_services() -> None:
    services = _compose()["services"]
    expected = {
        "kafka",
        "kafka-init",
        "simulator",
        "trainer",
        "worker",
        "anomaly-serve",
        "prometheus",
        "grafana",
    }
    assert expected <= set(services)
    assert services["kafka"]["image"] == "apache/kafka:4.1.0"
    assert services["trainer"]["restart"] == "no"
    assert services["trainer"]["build"]["target"] == "trainer"
    for name in ("worker", "anomaly-serve", "simulator"):
        assert services[name]["build"]["target"] == "worker", name
    worker = services["worker"]
    assert worker["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert worker["environment"]["SENSOR_ANOMALY_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    volumes = worker["volumes"]
    assert "models:/models:ro" in volumes
    assert "./deploy/config/worker.yaml:/etc/sensor-anomaly/worker.yaml:ro" in volumes
    assert "models:/models" in services["trainer"]["volumes"]
    init_script = " ".join(services["kafka-init"]["command"])
    for topic, partitions in [
        ("sensor-readings", 4),
        ("sensor-anomalies", None),
        ("sensor-readings-dlq", None),
    ]:
        assert f"--topic {topic} " in init_script
        if partitions:
            assert f"--topic {topic} --partitions {partitions}" in init_script
    simulator = " ".join(services["simulator"]["command"])
    assert "--rate 200" in simulator and "--bootstrap kafka:9092" in simulator
    # runs until stopped: anomaly-simulate rejects --duration 0, and any limit would end it
    assert "--duration" not in simulator and "--per-device" not in simulator
    prometheus_mounts = services["prometheus"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus_mounts


def test_compose_workers_scale() -> None:
    # `--scale worker=N` fails on a fixed host port or container_name, and two replicas
    # with one hostname would share Kafka's group.instance.id (worker default: hostname).
    worker = _compose()["services"]["worker"]
    for key in ("ports", "container_name", "hostname"):
        assert key not in worker, f"worker: {key} prevents --scale worker=N"
    assert not [n for n in _compose()["services"] if re.fullmatch(r"worker-\d+", n)]
    from worker.cli import STOP_GRACE_S

    grace = worker["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > STOP_GRACE_S, grace


def test_compose_limits_and_log_rotation() -> None:
    for name, service in _compose()["services"].items():
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("cpus") and limits.get("memory"), f"{name}: no resource limits"
        logging = service.get("logging") or {}
        assert logging.get("driver") == "json-file", f"{name}: no log rotation"
        assert logging["options"]["max-size"] and logging["options"]["max-file"], name


def test_compose_published_ports_bind_loopback() -> None:
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (
                f"{name}: {port} is published on all interfaces"
            )


@pytest.fixture(scope="module")
def check_jsonschema() -> str:
    return _dev_tool("check-jsonschema")


def _dev_tool(name: str) -> str:
    # From the [dev] extra: a missing tool is an install problem to fix, not a reason to skip.
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} not installed: pip install -e '.[dev]' (make install)"
    return found


def test_compose_matches_the_compose_spec(check_jsonschema: str) -> None:
    # check-jsonschema ships the compose-spec schema (vendor.compose-spec): offline.
    result = _run([check_jsonschema, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    _assert_ok(result)


def test_compose_spec_check_rejects_a_bad_file(check_jsonschema: str, tmp_path: Path) -> None:
    # The schema check must be able to fail: an unknown service key is refused.
    bad = _compose()
    bad["services"]["worker"]["replica"] = 2
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(bad))
    result = _run([check_jsonschema, "--builtin-schema", "vendor.compose-spec", str(path)])
    assert result.returncode != 0, result.stdout


def test_hadolint_dockerfile() -> None:
    hadolint = _dev_tool("hadolint")
    _assert_ok(_run([hadolint, "--failure-threshold", "info", str(DEPLOY / "Dockerfile")]))


def test_compose_runs_nothing_as_root() -> None:
    for name, service in _compose()["services"].items():
        user = service.get("user")
        assert user is not None, f"{name}: set an explicit non-root user"
        assert _uid(user) not in {"0", "root"}, f"{name}: runs as root"
    for name in ("worker", "anomaly-serve", "trainer", "simulator"):
        assert _uid(_compose()["services"][name]["user"]) == "10001"


def test_compose_bind_mounts_exist_and_volumes_declared() -> None:
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: named volume {source} not declared"
        build = service.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).is_file()


def _console_script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} not installed in this environment (pip install -e .)")
    return str(path)


def _dockerfile_json(instruction: str) -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    found = re.findall(rf"^{instruction}\s.*?(\[.*\])\s*$", text, re.M)
    assert found, instruction
    value = json.loads(found[-1])
    assert isinstance(value, list)
    return [str(v) for v in value]


def test_commands_parse_with_the_real_clis() -> None:
    # Appending --help makes argparse validate every option before it, without running.
    services = _compose()["services"]
    # The trainer runs a shell line: "anomaly-simulate ... && anomaly-train ...".
    trainer_steps = [shlex.split(step) for step in services["trainer"]["command"][0].split("&&")]
    commands = [
        services["simulator"]["command"],
        *trainer_steps,
        _stage_cmd(_dockerfile_stages()["worker"]),
        _stage_cmd(_dockerfile_stages()["trainer"]),
        _dockerfile_json("HEALTHCHECK"),
    ]
    for command in commands:
        result = _run([_console_script(command[0]), *command[1:], "--help"])
        assert result.returncode == 0, f"{command}: {result.stderr}"


def _dockerfile_stages() -> dict[str, str]:
    """Stage name -> that stage's text (continuation lines joined)."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    text = re.sub(r"^#.*\n", "", text, flags=re.M)
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _stage_cmd(body: str) -> list[str]:
    (cmd,) = re.findall(r"^CMD\s+(\[.*\])\s*$", body, re.M)
    value = json.loads(cmd)
    assert isinstance(value, list)
    return [str(v) for v in value]


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    # A pinned patch release (the one constraints.txt was frozen with), never a moving tag.
    (image,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), image
    frozen = re.search(r"Python (3\.\d+\.\d+)", (REPO / "constraints.txt").read_text())
    assert frozen and image.startswith(f"python:{frozen.group(1)}-"), (image, frozen)
    for line in re.findall(r"^FROM\s+(\S+)", text, re.M):
        assert line == "${PYTHON_IMAGE}" or line in _dockerfile_stages(), line
    stages = _dockerfile_stages()
    assert list(stages)[-1] == "worker", "the default target (last stage) is the worker"
    for target in ("worker", "trainer"):
        users = re.findall(r"^USER\s+(\S+)", stages[target], re.M)
        assert users and users[-1].split(":")[0] == "10001", target
    assert re.search(r"^HEALTHCHECK .*anomaly-healthcheck", stages["worker"], re.M)
    assert re.search(r"^HEALTHCHECK NONE", stages["trainer"], re.M)
    assert _stage_cmd(stages["worker"]) == [
        "anomaly-worker",
        "--config",
        "/etc/sensor-anomaly/worker.yaml",
    ]
    assert _stage_cmd(stages["trainer"])[0] == "anomaly-train"
    # Every install is constrained; only the trainer's venv gets the [train] extra.
    assert "PIP_CONSTRAINT=/src/constraints.txt" in stages["deps"]
    assert "[train]" in stages["deps-train"] and "[train]" not in stages["deps"]
    assert "--from=build-worker" in stages["worker"]
    assert "--from=build-trainer" in stages["trainer"]
    # the files the image copies must exist (wildcards may match nothing)
    for source in re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", text, re.M):
        for item in source.split():
            assert "*" in item or (REPO / item).exists(), item


def test_dockerfile_copies_every_package() -> None:
    # A package pyproject.toml ships but the image build forgets is a wheel without it.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    wheel_stage = _dockerfile_stages()["wheel"]
    for pattern in include:
        package = pattern.rstrip("*")
        if (REPO / package / "__init__.py").is_file():
            assert f"COPY {package}/ {package}/" in wheel_stage, package
    for data in ("schemas/", "examples/", "deploy/config/"):
        assert f"COPY {data} {data}" in wheel_stage, data


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def test_constraints_pin_every_dependency() -> None:
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            assert _requirement_name(name) not in pins, f"constraints.txt pins {name} twice"
            pins[_requirement_name(name)] = version
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["train"], *extras["confluent"]]
    wanted += pyproject["build-system"]["requires"]
    for requirement in wanted:
        assert _requirement_name(requirement) in pins, f"constraints.txt does not pin {requirement}"


def test_base_dependencies_have_no_training_library() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    assert base == {"numpy", "msgspec", "kafka-python", "prometheus-client", "pyyaml"} | (
        base & {"starlette", "uvicorn", "httptools", "anyio", "h11"}  # the HTTP server
    ), base
    train = {_requirement_name(r) for r in project["optional-dependencies"]["train"]}
    assert train == {"tensorflow", "scikit-learn", "matplotlib"}
    dev = " ".join(project["optional-dependencies"]["dev"])
    assert "sensor-anomaly[train" in dev
    assert project["license"] == "Apache-2.0"
    license_text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text


def test_compose_trainer_config_is_valid() -> None:
    from trainer.config import load_config

    cfg = load_config(REPO / "deploy/config/trainer.yaml")
    assert cfg.registry == "/models" and cfg.name == "sensors"


def test_compose_serve_config_is_valid() -> None:
    from serve.config import load_config

    cfg = load_config(REPO / "deploy/config/serve.yaml")
    assert cfg.serve.registry == "/models" and cfg.serve.port == 8080
    assert cfg.serve.host == "0.0.0.0"  # reachable through the published port
