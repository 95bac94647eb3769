"""Every Kubernetes manifest in deploy/kubernetes/ against Kubernetes' own OpenAPI
schemas, in strict mode (an unknown or misspelt field fails), with the
kubernetes-validate package (the test extra). Its schemas ship inside the package,
so this runs offline: the test checks they are there for the versions used, the
oldest our manifests support (1.27: native gRPC probes) and the newest bundled.

The HorizontalPodAutoscaler is checked for what docs/deploy.md promises: CPU, on the
Deployment, from the Deployment's replica count up."""

from __future__ import annotations

import copy
from importlib import resources

import pytest
import yaml
from support import REPO

kv = pytest.importorskip("kubernetes_validate",
                         reason="kubernetes-validate is in the test extra: pip install -e '.[test]'")

MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
OLDEST = "1.27.0"  # gRPC probes (deployment.yaml) are GA from 1.27


def _docs():
    return [(path.name, doc) for path in MANIFESTS
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _versions() -> list[str]:
    return [OLDEST, kv.utils.latest_version()]


def test_the_schemas_are_bundled_with_the_package():
    bundled = resources.files("kubernetes_validate").joinpath("kubernetes-json-schema")
    for version in _versions():
        major_minor = ".".join(version.split(".")[:2])
        (directory,) = [d for d in bundled.iterdir()
                        if d.name.startswith(f"v{major_minor}.") and d.name.endswith("-strict")]
        assert directory.joinpath("_definitions.json").is_file(), directory


@pytest.mark.parametrize("version", _versions())
def test_every_manifest_passes_kubernetes_schemas_in_strict_mode(version):
    docs = _docs()
    assert {doc["kind"] for _, doc in docs} >= {
        "Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for name, doc in docs:
        kv.validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_strict_validation_catches_a_misspelt_field():
    """The check has teeth: one misspelt key in the Deployment fails it."""
    (deployment,) = [doc for _, doc in _docs() if doc["kind"] == "Deployment"]
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.utils.ValidationError, match="readinesProbe"):
        kv.validate(broken, kv.utils.latest_version(), strict=True)


def test_the_autoscaler_scales_the_deployment_on_cpu():
    by_kind = {doc["kind"]: doc for _, doc in _docs()}
    hpa, deployment = by_kind["HorizontalPodAutoscaler"], by_kind["Deployment"]
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": deployment["apiVersion"],
                                      "kind": "Deployment",
                                      "name": deployment["metadata"]["name"]}
    assert spec["minReplicas"] == deployment["spec"]["replicas"] < spec["maxReplicas"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    # utilization is measured against the pod's CPU request, which must be set
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"]
    # the replicas an autoscaler adds get calls: every server sends GOAWAY
    config = by_kind["ConfigMap"]["data"]
    assert float(config["GRADSERVE_MAX_CONNECTION_AGE"]) > 0
