"""The chart as Helm renders it: the real Helm (Go SDK, through helm-python-sdk), offline, and what it produced.

Shared by the chart tests; each example values file and the defaults are rendered once per session.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from helm_python import _native

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "garrison"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
# None stands for the chart's defaults.
VALUE_FILES: list[Path | None] = [None, *EXAMPLES]
MONITORING_APIS = ["monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor",
                   "monitoring.coreos.com/v1/PrometheusRule"]
RELEASE, NAMESPACE = "garrison", "serving"
KUBE_VERSIONS = ["1.29.0", "1.37.0"]  # the oldest the chart's kubeVersion allows, and the newest schemas known

helm.disable_logging()  # the dashboard is a symlink into ops/dashboards/; Helm logs that it follows it


def value_id(path: Path | None) -> str:
    return "defaults" if path is None else path.stem


def read_values(path: Path | None) -> dict[str, Any]:
    """A values file as Helm itself parses it (`-f FILE`)."""
    return {} if path is None else helm.values_from_yaml(path.read_text())


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render_files(values: dict[str, Any], *, monitoring: bool = True, kube_version: str | None = None) -> dict[str, str]:
    """`helm template`: template path -> manifest. `monitoring` says whether the cluster serves the Prometheus
    Operator's APIs (.Capabilities.APIVersions); the SDK's Python wrapper does not expose that option, so the C
    entry point is called with it."""
    options: dict[str, Any] = {"name": RELEASE, "namespace": NAMESPACE}
    if monitoring:
        options["api_versions"] = MONITORING_APIS
    if kube_version:
        options["kube_version"] = f"v{kube_version}"
    rendered = _native.call_string("helm_render", chart()._raw(), json.dumps(values), json.dumps(options))
    return json.loads(rendered)


@dataclass(frozen=True)
class Rendered:
    objects: list[dict[str, Any]]
    notes: str = ""  # NOTES.txt as Helm prints it after an install

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in found]}"
        return found[0]

    def serve_config(self) -> str:
        return self.one("ConfigMap", "-config")["data"]["config.yaml"]

    def pod_specs(self) -> list[tuple[str, dict[str, Any]]]:
        """(where, pod spec) of every pod the release creates: workloads, Jobs and the RayCluster's groups."""
        specs = []
        for o in self.objects:
            where = f"{o['kind']}/{o['metadata']['name']}"
            if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
                specs.append((where, o["spec"]["template"]))
            elif o["kind"] == "RayCluster":
                specs.append((f"{where}/head", o["spec"]["headGroupSpec"]["template"]))
                specs += [(f"{where}/{g['groupName']}", g["template"]) for g in o["spec"]["workerGroupSpecs"]]
        return specs


def parse(files: dict[str, str]) -> Rendered:
    objects = [doc for name, text in files.items() if name.endswith((".yaml", ".yml"))
               for doc in yaml.safe_load_all(text) if doc]
    notes = next((text for name, text in files.items() if name.endswith("/NOTES.txt")), "")
    return Rendered(objects, notes)


@functools.cache
def rendered(path: Path | None, monitoring: bool = True) -> Rendered:
    return parse(render_files(read_values(path), monitoring=monitoring))
