"""deploy/kubernetes: the base and every overlay render with kubectl kustomize, and
every object validates offline against the Kubernetes schemas (kubernetes-validate)
and the Prometheus Operator's CRD schemas (cloudcoil's models of them)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config.loader import load_config
from exporter.storage.postgres import is_postgres_url
from grafana.mixin_config import load_config as load_mixin
from tests.conftest import tool
from tests.integration.grafana_helpers import ALERTS, ROOT

KUBE = ROOT / "deploy" / "kubernetes"
TREES = [KUBE / "base", *sorted(p for p in (KUBE / "overlays").iterdir() if p.is_dir())]
KUBERNETES_VERSION = "1.33.0"


def render(tree: Path) -> list[dict[str, Any]]:
    kubectl = tool("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(tree)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [o["kind"] for o in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {o["kind"]: o for o in objects}


@pytest.mark.parametrize("tree", TREES, ids=[p.name for p in TREES])
def test_every_object_validates_against_its_schema(tree: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    operator = pytest.importorskip("cloudcoil.models.prometheus_operator.v1")
    objects = render(tree)
    # One process with its volume, or shards sharing PostgreSQL (no volume).
    workload = (
        {"StatefulSet"} if tree.name == "sharded" else {"PersistentVolumeClaim", "Deployment"}
    )
    assert {o["kind"] for o in objects} == {
        "ConfigMap",
        "Secret",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
        *workload,
    }
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            model = getattr(operator, obj["kind"]).model_validate(obj)
            # The models ignore unknown fields: what they keep must be all we wrote.
            kept = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
            assert kept == obj, obj["kind"]
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_deployment_is_one_locked_writer_on_a_volume_locked_down() -> None:
    objects = by_kind(render(KUBE / "base"))
    deployment = objects["Deployment"]["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"] == {"type": "Recreate"}
    pod = deployment["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    storage = next(a for a in container["args"] if a.startswith("--storage.path="))
    data_dir = str(Path(storage.split("=", 1)[1]).parent)
    claim = volumes[mounts[data_dir]]["persistentVolumeClaim"]["claimName"]
    assert claim == objects["PersistentVolumeClaim"]["metadata"]["name"]
    # The generated ConfigMap and Secret (names with a hash) are the ones mounted.
    assert volumes["config"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert volumes["secrets"]["secret"]["secretName"] == objects["Secret"]["metadata"]["name"]


def test_the_config_map_loads_with_the_secret_files(tmp_path: Path) -> None:
    objects = by_kind(render(KUBE / "base"))
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for key, value in objects["Secret"]["data"].items():
        (secrets / key).write_bytes(base64.b64decode(value))
    text = objects["ConfigMap"]["data"]["config.yaml"]
    assert "/run/secrets/import-status-exporter/" in text
    config = tmp_path / "config.yaml"
    config.write_text(text.replace("/run/secrets/import-status-exporter", str(secrets)))
    assert [s.name for s in load_config(str(config)).sources] == ["elevate-prod"]


def test_service_monitor_scrapes_the_service_as_the_job_the_alerts_select() -> None:
    objects = by_kind(render(KUBE / "base"))
    monitor, service = objects["ServiceMonitor"]["spec"], objects["Service"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    job = service["metadata"]["labels"][monitor["jobLabel"]]
    assert load_mixin().selector == f'job="{job}"'


@pytest.mark.parametrize("tree", TREES, ids=[p.name for p in TREES])
def test_prometheus_rule_groups_equal_alerts_yaml(tree: Path) -> None:
    rule = by_kind(render(tree))["PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_kube_prometheus_stack_overlay_labels_what_its_prometheus_selects() -> None:
    objects = by_kind(render(KUBE / "overlays" / "kube-prometheus-stack"))
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert objects[kind]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"monitoring"}


def test_the_validation_catches_unknown_fields() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    operator = pytest.importorskip("cloudcoil.models.prometheus_operator.v1")
    objects = by_kind(render(KUBE / "base"))
    deployment = objects["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    monitor = objects["ServiceMonitor"]
    monitor["spec"]["endpoints"][0]["scrapeInterval"] = "30s"
    kept = operator.ServiceMonitor.model_validate(monitor).model_dump(
        mode="json", by_alias=True, exclude_unset=True
    )
    assert kept != monitor


def test_the_sharded_overlay_runs_one_shard_per_pod_on_postgres_from_the_secret() -> None:
    objects = by_kind(render(KUBE / "overlays" / "sharded"))
    stateful = objects["StatefulSet"]["spec"]
    container = stateful["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--shard.from-hostname" in args
    assert f"--total-shards={stateful['replicas']}" in args  # one shard per pod
    assert objects["Service"]["spec"]["clusterIP"] == "None"  # stable pod names
    assert stateful["serviceName"] == objects["Service"]["metadata"]["name"]
    # The shards share PostgreSQL: the URL (a secret) comes from the Secret
    # through the environment, not a flag, and no pod keeps a file of its own.
    assert not any(arg.startswith(("--storage.path", "--storage.url")) for arg in args)
    assert "volumeClaimTemplates" not in stateful
    (variable,) = [e for e in container["env"] if e["name"] == "IMPORT_STATUS_EXPORTER_STORAGE_URL"]
    reference = variable["valueFrom"]["secretKeyRef"]
    secret = objects["Secret"]
    assert reference["name"] == secret["metadata"]["name"]
    url = base64.b64decode(secret["data"][reference["key"]]).decode()
    assert is_postgres_url(url)
    assert {"elevate-api-key", "api-tokens"} <= set(secret["data"])  # the base's, kept
