"""The Helm chart (deploy/helm/sensor-anomaly), rendered with the real helm and checked.

* `helm lint --strict` and `helm template` for several value sets;
* every rendered core manifest validated offline against the Kubernetes API schemas
  (kubernetes-validate, strict: unknown fields are errors) for the oldest and newest
  Kubernetes the chart supports;
* the custom resources (KEDA, Prometheus Operator) have no schema offline here: their
  fields are checked by structure below, and the PrometheusRule's rules with promtool;
* the ConfigMap's worker.yaml / serve.yaml / trainer.yaml are loaded by the programs' own
  config loaders, so a chart default the programs refuse fails here, not in a cluster.

helm comes from `scripts/tools.sh install` (built once with `go install` into .cache/bin).
These tests skip only when that is impossible (no Go toolchain); a failed build fails.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "sensor-anomaly"
RULES = REPO / "deploy" / "prometheus" / "rules"
HELM = REPO / ".cache" / "bin" / "helm"
# Oldest and newest Kubernetes the chart is validated for (CronJob timeZone is GA in 1.27).
KUBE_VERSIONS = ["1.27.0", "1.37.0"]
CORE_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1"}
WORKER_JOB = "sensor-anomaly-worker"

SASL_TLS = {
    "kafka.securityProtocol": "SASL_SSL",
    "kafka.sasl.mechanism": "SCRAM-SHA-512",
    "kafka.sasl.existingSecret": "kafka-user",
    "kafka.tls.existingSecret": "kafka-tls",
    "kafka.tls.certKey": "tls.crt",
    "kafka.tls.keyKey": "tls.key",
    "kafka.tls.keyPasswordKey": "key-password",
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "sasl-tls-cron": {
        **SASL_TLS,
        "trainer.cronJob.enabled": True,
        "trainer.cronJob.timeZone": "Etc/UTC",
        "metrics.grafanaDashboard.enabled": True,
        "serve.tokenSecret.existingSecret": "serve-token",
    },
    "no-keda-no-serve": {"keda.enabled": False, "serve.enabled": False, "worker.replicas": 3},
    "baked-image": {
        "model.source": "image",
        "trainer.job.enabled": False,
        "networkPolicy.enabled": False,
        "metrics.podMonitor.enabled": False,
        "metrics.prometheusRule.enabled": False,
    },
}


@pytest.fixture(scope="module")
def helm() -> str:
    if not HELM.exists():
        if shutil.which("go") is None:
            pytest.skip("helm is built with `go install` and there is no Go toolchain here")
        # Build it as `make install` would; a failure here is a failure, not a skip.
        result = subprocess.run(
            [str(REPO / "scripts" / "tools.sh"), "install"],
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        assert result.returncode == 0, f"scripts/tools.sh install failed:\n{result.stderr}"
    return str(HELM)


def _set_args(values: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, bool | int) else str(value)
        args += ["--set-string" if isinstance(value, str) else "--set", f"{key}={text}"]
    return args


def _helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=120, check=False, cwd=REPO
    )


def render(helm: str, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    result = _helm(
        helm, "template", "demo", str(CHART), "--namespace", "sa", *_set_args(values or {})
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def render_error(helm: str, values: dict[str, Any]) -> str:
    result = _helm(helm, "template", "demo", str(CHART), *_set_args(values))
    assert result.returncode != 0, f"rendered although {values} is invalid"
    return result.stderr


@pytest.fixture(scope="module")
def rendered(helm: str) -> dict[str, list[dict[str, Any]]]:
    return {name: render(helm, values) for name, values in VALUE_SETS.items()}


def _one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and (
            component is None
            or d["metadata"]["labels"].get("app.kubernetes.io/component") == component
        )
    ]
    assert len(found) == 1, f"{len(found)} {kind} {component or ''}"
    return found[0]


def _pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in {"Deployment", "Job"}:
            yield name, d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            yield name, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]


# ------------------------------------------------------------------ helm itself


def test_helm_lint_strict(helm: str) -> None:
    for name, values in VALUE_SETS.items():
        result = _helm(helm, "lint", "--strict", str(CHART), *_set_args(values))
        assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"


def test_every_value_set_renders_what_it_enables(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {name: sorted(d["kind"] for d in docs) for name, docs in rendered.items()}
    for kind in ["ScaledObject", "PodMonitor", "PrometheusRule", "NetworkPolicy", "Job"]:
        assert kind in kinds["default"], kind
    assert "TriggerAuthentication" in kinds["sasl-tls-cron"]
    assert "CronJob" in kinds["sasl-tls-cron"]
    assert "ScaledObject" not in kinds["no-keda-no-serve"]
    assert "Service" not in kinds["no-keda-no-serve"]
    assert "PersistentVolumeClaim" not in kinds["baked-image"]


# ------------------------------------------------------- core manifests (schema)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_core_manifests_validate_offline(
    rendered: dict[str, list[dict[str, Any]]], kube_version: str, tmp_path: Path
) -> None:
    validator = Path(sys.executable).parent / "kubernetes-validate"
    assert validator.exists(), "kubernetes-validate missing: pip install -e '.[dev]'"
    files = []
    for name, docs in rendered.items():
        core = [d for d in docs if d["apiVersion"] in CORE_GROUPS]
        assert core, name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(core))
        files.append(str(path))
    result = subprocess.run(
        [str(validator), "--strict", "--quiet", "-k", kube_version, *files],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_offline_validation_can_fail(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    # A misspelt field must be refused, or the test above proves nothing.
    deployment = _one(rendered["default"], "Deployment", "worker")
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    validator = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run(
        [str(validator), "--strict", "--quiet", "-k", KUBE_VERSIONS[0], str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "livenessprobe" in result.stdout + result.stderr


# ------------------------------------------------------------------- the pods


def test_worker_deployment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from worker.cli import STOP_GRACE_S

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["worker"]["stopBoundSeconds"] == STOP_GRACE_S, "keep in step with worker/cli.py"
    deployment = _one(rendered["default"], "Deployment", "worker")
    spec = deployment["spec"]
    assert "replicas" not in spec, "with KEDA the ScaledObject owns the replica count"
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > STOP_GRACE_S
    (container,) = pod["containers"]
    assert container["args"] == ["anomaly-worker", "--config", "/etc/sensor-anomaly/worker.yaml"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = _configs(rendered["default"])["worker.yaml"]
    assert ports["http"] == config["http"]["port"] and config["http"]["host"] == "0.0.0.0"
    fixed = _one(rendered["no-keda-no-serve"], "Deployment", "worker")
    assert fixed["spec"]["replicas"] == 3


def test_serve_deployment_and_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    deployment = _one(docs, "Deployment", "serve")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["anomaly-serve", "--config", "/etc/sensor-anomaly/serve.yaml"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    service = _one(docs, "Service", "serve")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    assert {p["name"] for p in container["ports"]} == {"http"}


def test_every_pod_is_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for set_name, docs in rendered.items():
        for name, pod in _pod_specs(docs):
            where = f"{set_name} {name}"
            security = pod["securityContext"]
            assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, where
            assert security["seccompProfile"]["type"] == "RuntimeDefault", where
            assert pod["automountServiceAccountToken"] is False, where
            mounts_tmp = any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])
            assert mounts_tmp, f"{where}: no writable /tmp on a read-only root filesystem"
            for container in pod["containers"] + pod.get("initContainers", []):
                c = container["securityContext"]
                assert c["readOnlyRootFilesystem"] is True, where
                assert c["allowPrivilegeEscalation"] is False, where
                assert c["capabilities"]["drop"] == ["ALL"], where
                assert "add" not in c["capabilities"], where
                resources = container["resources"]
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(resources[kind]), f"{where}: {kind}"
                assert container["image"].rsplit(":", 1)[-1] != "latest", where


def test_trainer_job_and_cronjob(rendered: dict[str, list[dict[str, Any]]]) -> None:
    job = _one(rendered["default"], "Job")
    assert job["metadata"]["name"].endswith("-1"), "the name carries the release revision"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("sensor-anomaly-trainer:")
    assert container["args"][0] == "anomaly-train"
    models = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert not models.get("readOnly"), "the trainer writes the registry"
    cron = _one(rendered["sasl-tls-cron"], "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["timeZone"] == "Etc/UTC"


def test_models_on_a_read_write_many_claim(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    pvc = _one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for component in ("worker", "serve"):
        pod = _one(docs, "Deployment", component)["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        mounts = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == "models"]
        assert mounts and all(m["readOnly"] is True for m in mounts), component
        (init,) = pod["initContainers"]
        assert init["name"] == "wait-for-model"
        assert '"$0/$1/CURRENT"' in " ".join(init["command"]), "waits for the registry pointer"


def test_baked_image_mode(helm: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, pod in _pod_specs(rendered["baked-image"]):
        assert all(v["name"] != "models" for v in pod["volumes"]), name
        assert "initContainers" not in pod, name
    error = render_error(helm, {"model.source": "image"})
    assert "trainer.job.enabled=false" in error
    assert "/model/source" in render_error(helm, {"model.source": "s3"})


# ------------------------------------------------------------ config and secrets


def _configs(docs: list[dict[str, Any]]) -> dict[str, Any]:
    data = _one(docs, "ConfigMap", "config")["data"]
    return {name: yaml.safe_load(text) for name, text in data.items()}


def _pod_env(docs: list[dict[str, Any]], component: str) -> dict[str, str]:
    pod = _one(docs, "Deployment", component)["spec"]["template"]["spec"]
    return {
        e["name"]: e.get("value", "stand-in-for-a-secret")
        for e in pod["containers"][0].get("env", [])
    }


def test_rendered_configs_load_with_the_programs_loaders(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    from serve.config import load_config as load_serve
    from trainer.config import load_config as load_trainer
    from worker.config import load_config as load_worker

    for name, docs in rendered.items():
        data = _one(docs, "ConfigMap", "config")["data"]
        # The TLS Secret is mounted at /etc/sensor-anomaly/tls: stand in files for its keys
        # (the worker checks they are readable).
        tls = tmp_path / "tls"
        tls.mkdir(exist_ok=True)
        for key in ("ca.crt", "tls.crt", "tls.key"):
            (tls / key).write_text("stand-in")
        for file, text in data.items():
            (tmp_path / file).write_text(text.replace("/etc/sensor-anomaly/tls/", f"{tls}/"))
        # Each program with the environment its pod gets (Secret values stood in for).
        worker = load_worker(tmp_path / "worker.yaml", env=_pod_env(docs, "worker"))
        assert worker.kafka.bootstrap_servers == "kafka:9092", name
        assert worker.model.registry == "/models" and worker.http.host == "0.0.0.0"
        if any(d["kind"] == "Deployment" and "serve" in d["metadata"]["name"] for d in docs):
            serve = load_serve(tmp_path / "serve.yaml", env=_pod_env(docs, "serve"))
            assert serve.serve.registry == worker.model.registry, name
            assert serve.serve.host == "0.0.0.0", name
        trainer = load_trainer(tmp_path / "trainer.yaml")
        assert trainer.registry == worker.model.registry and trainer.name == worker.model.name


def test_secrets_come_from_secret_refs(
    helm: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered["sasl-tls-cron"]
    config = _configs(docs)["worker.yaml"]["kafka"]
    assert config["security_protocol"] == "SASL_SSL" and config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["ssl_cafile"] == "/etc/sensor-anomaly/tls/ca.crt"
    assert config["ssl_certfile"] == "/etc/sensor-anomaly/tls/tls.crt"
    assert "sasl_password" not in config and "ssl_password" not in config
    pod = _one(docs, "Deployment", "worker")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    for name, secret, key in [
        ("SENSOR_ANOMALY_KAFKA__SASL_PASSWORD", "kafka-user", "password"),
        ("SENSOR_ANOMALY_KAFKA__SASL_USERNAME", "kafka-user", "username"),
        ("SENSOR_ANOMALY_KAFKA__SSL_PASSWORD", "kafka-tls", "key-password"),
    ]:
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}, name
    tls = next(v for v in pod["volumes"] if v["name"] == "kafka-tls")
    assert tls["secret"]["secretName"] == "kafka-tls"
    # A password in the values would end up in a ConfigMap: refused.
    error = render_error(helm, {"worker.config.kafka.sasl_password": "hunter2"})
    assert "secrets are not values" in error
    assert "existingSecret" in render_error(helm, {"kafka.securityProtocol": "SASL_SSL"})


# --------------------------------------------------------------------- KEDA


def test_keda_scales_the_workers_on_the_groups_lag(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["default"]
    scaled = _one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    deployment = _one(docs, "Deployment", "worker")
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["maxReplicaCount"] <= values["kafka"]["inputPartitions"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    # KEDA's CRD types trigger metadata as map[string]string.
    assert all(isinstance(v, str) for v in metadata.values()), metadata
    kafka = _configs(docs)["worker.yaml"]["kafka"]
    assert metadata["bootstrapServers"] == kafka["bootstrap_servers"]
    assert metadata["consumerGroup"] == kafka["group_id"]
    assert [metadata["topic"]] == kafka["input_topics"]
    assert metadata["offsetResetPolicy"] == kafka["auto_offset_reset"]
    assert metadata["allowIdleConsumers"] == "false"
    assert int(metadata["lagThreshold"]) > 0
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60


def test_keda_authenticates_like_the_workers(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["sasl-tls-cron"]
    trigger = _one(docs, "ScaledObject")["spec"]["triggers"][0]
    assert trigger["metadata"]["sasl"] == "scram_sha512"
    assert trigger["metadata"]["tls"] == "enable"
    auth = _one(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "username": ("kafka-user", "username"),
        "password": ("kafka-user", "password"),
        "ca": ("kafka-tls", "ca.crt"),
        "cert": ("kafka-tls", "tls.crt"),
        "key": ("kafka-tls", "tls.key"),
        "keyPassword": ("kafka-tls", "key-password"),
    }


def test_max_replicas_above_partitions_is_refused(helm: str) -> None:
    error = render_error(helm, {"keda.maxReplicaCount": 8, "kafka.inputPartitions": 4})
    assert "keda.maxReplicaCount (8) is above kafka.inputPartitions (4)" in error
    assert render(helm, {"keda.maxReplicaCount": 8, "kafka.inputPartitions": 8})
    error = render_error(helm, {"keda.enabled": False, "worker.replicas": 5})
    assert "worker.replicas (5) is above kafka.inputPartitions (4)" in error


def test_values_schema_refuses_typos_and_bad_values(helm: str) -> None:
    # values.schema.json: a misspelt key or an impossible value stops the render, naming it.
    assert "'maxReplicas' not allowed" in render_error(helm, {"keda.maxReplicas": 3})
    assert "/kafka/securityProtocol" in render_error(helm, {"kafka.securityProtocol": "SASL"})
    assert "/keda/lagThreshold" in render_error(helm, {"keda.lagThreshold": "0"})


def test_grace_period_must_exceed_the_stop_bound(helm: str) -> None:
    error = render_error(helm, {"worker.terminationGracePeriodSeconds": 30})
    assert "must be above worker.stopBoundSeconds (30)" in error


# ------------------------------------------------------------ disruption, network


def test_pod_disruption_budgets_select_their_pods(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["default"]
    for component in ("worker", "serve"):
        pdb = _one(docs, "PodDisruptionBudget", component)
        labels = _one(docs, "Deployment", component)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), component
    assert _one(docs, "PodDisruptionBudget", "worker")["spec"]["maxUnavailable"] == 1


def test_network_policies(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    for component in ("worker", "serve", "trainer"):
        policy = _one(docs, "NetworkPolicy", component)
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        selected = spec["podSelector"]["matchLabels"]
        pods = [
            d["spec"]["template"]["metadata"]["labels"]
            for d in docs
            if d["kind"] in {"Deployment", "Job"}
            and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        ]
        assert pods and all(selected.items() <= p.items() for p in pods), component
        egress_ports = {p["port"] for rule in spec["egress"] for p in rule["ports"]}
        assert {53, 9092} <= egress_ports, component
        if component == "trainer":
            assert spec["ingress"] == []
        else:
            (rule,) = spec["ingress"]
            assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
            assert rule["from"], "no peer list would allow everyone"


def test_worker_extra_egress(helm: str, tmp_path: Path) -> None:
    # e.g. to Alertmanager (alertmanager.enabled): only the workers get the extra rule.
    rule = {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}],
        "ports": [{"port": 9093, "protocol": "TCP"}],
    }
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {"workerExtraEgress": [rule]}}))
    result = _helm(helm, "template", "demo", str(CHART), "-f", str(values))
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert rule in _one(docs, "NetworkPolicy", "worker")["spec"]["egress"]
    assert rule not in _one(docs, "NetworkPolicy", "serve")["spec"]["egress"]
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] == "NetworkPolicy"]))
    validator = Path(sys.executable).parent / "kubernetes-validate"
    checked = subprocess.run(
        [str(validator), "--strict", "--quiet", "-k", KUBE_VERSIONS[0], str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --------------------------------------------------------------- monitoring


def test_pod_monitors_scrape_the_metrics_port_as_the_rules_job(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["default"]
    for component, job in [("worker", WORKER_JOB), ("serve", "sensor-anomaly-serve")]:
        monitor = _one(docs, "PodMonitor", component)
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        labels = _one(docs, "Deployment", component)["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
        job_relabel = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
        assert job_relabel == [{"action": "replace", "targetLabel": "job", "replacement": job}]
    # The job the rules select on is the one the PodMonitor sets.
    alerts = (RULES / "alerts.yml").read_text()
    assert f'job="{WORKER_JOB}"' in alerts


def test_chart_rules_are_the_tested_rule_files() -> None:
    # helm reads only inside the chart: files/rules links to deploy/prometheus/rules, so
    # there is one copy of the rules. Check the link resolves there and every file matches.
    linked = CHART / "files" / "rules"
    assert linked.resolve() == RULES.resolve(), f"{linked} must link to {RULES}"
    names = sorted(p.name for p in RULES.glob("*.yml"))
    assert names and names == sorted(p.name for p in linked.glob("*.yml"))
    for name in names:
        assert filecmp.cmp(linked / name, RULES / name, shallow=False), name
    dashboards = CHART / "files" / "dashboards" / "sensor-anomaly.json"
    source = REPO / "deploy" / "grafana" / "dashboards" / "sensor-anomaly.json"
    assert filecmp.cmp(dashboards, source, shallow=False)


def test_prometheus_rule_carries_every_rule_file(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    rule = _one(rendered["default"], "PrometheusRule")
    groups = rule["spec"]["groups"]
    expected = [
        g
        for path in sorted(RULES.glob("*.yml"))
        for g in yaml.safe_load(path.read_text())["groups"]
    ]
    assert groups == expected
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`, scripts/system-deps.sh)")
    path = tmp_path / "from-chart.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_runbook_links_get_the_configured_base(helm: str) -> None:
    base = "https://git.example.org/ops/sensor-anomaly/-/blob/v0.1.0"
    rule = _one(
        render(helm, {"metrics.prometheusRule.runbookBaseUrl": base + "/"}), "PrometheusRule"
    )
    urls = [
        r["annotations"]["runbook_url"]
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        if "alert" in r
    ]
    assert urls and all(u.startswith(base + "/docs/runbook.md#") for u in urls), urls


def test_grafana_dashboard_config_map(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dashboard = _one(rendered["sasl-tls-cron"], "ConfigMap", "dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = REPO / "deploy" / "grafana" / "dashboards" / "sensor-anomaly.json"
    assert json.loads(dashboard["data"]["sensor-anomaly.json"]) == json.loads(source.read_text())
