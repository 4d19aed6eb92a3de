"""The Helm chart, rendered and linted by the real Helm, checked against independent oracles: Kubernetes' own schemas
(kubernetes-validate, strict, two minor versions), the KubeRay v1.7.0 CRD, Garrison's own config loader (`garrison
serve --check --static`), a PromQL parser and the metric names Garrison's telemetry really exports."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_render import (
    CHART,
    EXAMPLES,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    ROOT,
    VALUE_FILES,
    chart,
    parse,
    read_values,
    render_files,
    rendered,
    value_id,
)

CRD_KINDS = {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
KUBERAY_CRD = ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0" / "ray.io_rayclusters.yaml"
if not KUBERAY_CRD.exists():  # a worktree beside main: shared/ is next to the main checkout
    KUBERAY_CRD = Path("/work/shared/schemas/kuberay-v1.7.0/ray.io_rayclusters.yaml")
values_files = pytest.mark.parametrize("path", VALUE_FILES, ids=value_id)


def merged(path: Path | None) -> dict[str, Any]:
    return chart().merge_values(read_values(path))


# -- Helm itself --------------------------------------------------------------------------------------------------


@values_files
def test_helm_lint_strict_finds_nothing(path):
    report = helm.lint(CHART, read_values(path), strict=True, kube_version=f"v{KUBE_VERSIONS[0]}", namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert problems == []


def test_packaged_chart_renders_like_the_directory_and_leaves_out_the_examples(tmp_path):
    archive = helm.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "garrison/values.schema.json" in names and "garrison/dashboards/garrison.json" in names
    assert not [n for n in names if "/examples/" in n]
    with helm.Chart.load(archive) as packaged:
        assert packaged.render({}, name=RELEASE, namespace=NAMESPACE) == chart().render({}, name=RELEASE,
                                                                                         namespace=NAMESPACE)


# -- Kubernetes and KubeRay schemas -------------------------------------------------------------------------------


@values_files
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_validates_against_kubernetes(path, version):
    objects = rendered(path).objects
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Deployment", "Service", "NetworkPolicy", "RayCluster"}
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)


def closed(schema: Any) -> Any:
    """The CRD's schema as the API server applies it with strict field validation (kubectl's default): an object
    with listed properties takes no others, unless it says it preserves unknown fields."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def raycluster_schema():
    crd = yaml.safe_load(KUBERAY_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return closed(version["schema"]["openAPIV3Schema"])


@values_files
def test_raycluster_validates_against_the_kuberay_crd(path, raycluster_schema):
    cluster = rendered(path).one("RayCluster")
    jsonschema.Draft7Validator(raycluster_schema).validate(cluster)
    for version in KUBE_VERSIONS:  # the CRD's pod templates are loose on Kubernetes' own rules: check those too
        for where, template in rendered(path).pod_specs():
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **template["metadata"]},
                   "spec": template["spec"]}
            kubernetes_validate.validate(pod, version, strict=True)


def test_the_crd_check_refuses_what_kuberay_refuses(raycluster_schema):
    cluster = copy.deepcopy(rendered(None).one("RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["numOfHostz"] = 2
    with pytest.raises(jsonschema.ValidationError, match="numOfHostz"):
        jsonschema.Draft7Validator(raycluster_schema).validate(cluster)


# -- The serve config: Garrison's own loader ----------------------------------------------------------------------


def test_every_serve_config_passes_garrison_serve_check(tmp_path):
    files = []
    for path in VALUE_FILES:
        file = tmp_path / f"{value_id(path)}.yaml"
        file.write_text(rendered(path).serve_config())
        files.append(str(file))
    # And one the loader must refuse, so this check cannot pass by accepting everything.
    bad = yaml.safe_load(rendered(None).serve_config())
    bad["models"][0]["groups"][0]["tp"] = "2"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    # One interpreter runs `garrison serve --check --static --json` on every file, as the CLI would (python -m
    # garrison.cli), with this tree's code.
    script = ("import sys; from garrison.cli import main\n"
              "print([main(['serve', '--check', '--static', '--json', '--config', f]) for f in sys.argv[1:]])")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}{os.pathsep}{ROOT / 'workers'}"}
    result = subprocess.run([sys.executable, "-c", script, *files, str(tmp_path / "bad.yaml")], capture_output=True,
                            text=True, env=env, timeout=120, check=False)
    reports = [json.loads(r) for r in re.findall(r"^\{.*?^\}", result.stdout, re.MULTILINE | re.DOTALL)]
    assert [r["problems"] for r in reports[:-1]] == [[]] * len(files), result.stdout + result.stderr
    assert reports[-1]["ok"] is False
    assert "config.models[0].groups[0].tp" in json.dumps(reports[-1]["problems"])
    assert result.stdout.strip().splitlines()[-1] == str([0] * len(files) + [1])


# -- What the chart deploys ----------------------------------------------------------------------------------------


@values_files
def test_one_worker_group_per_model_group_placed_by_its_ray_resource(path):
    values, out = merged(path), rendered(path)
    cluster, config = out.one("RayCluster"), yaml.safe_load(out.serve_config())
    groups = cluster["spec"]["workerGroupSpecs"]
    expected = [(m["name"], g["role"]) for m in values["models"] for g in m["groups"]]
    assert [(g["template"]["metadata"]["labels"]["garrison/model"], g["template"]["metadata"]["labels"]["garrison/role"])
            for g in groups] == expected
    assert len({g["groupName"] for g in groups}) == len(groups)
    config_resources = [g["resource"] for m in config["models"] for g in m["groups"]]
    for group, resource, (model_name, _) in zip(groups, config_resources, expected):
        model = next(m for m in values["models"] if m["name"] == model_name)
        advertised = json.loads(json.loads(group["rayStartParams"]["resources"]))  # KubeRay's quoted JSON string
        assert advertised == {resource: model["gpusPerPod"]}
        assert resource == f"garrison/{group['groupName']}"
        assert group["numOfHosts"] == model["numOfHosts"]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == model["replicas"]
        container = group["template"]["spec"]["containers"][0]
        on_gpu = model["engine"].get("device", "cpu").startswith("cuda")
        assert container["resources"].get("limits", {}).get("nvidia.com/gpu") == (model["gpusPerPod"] if on_gpu
                                                                                   else None)
        if on_gpu and values["workers"]["gpuType"]:
            assert group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == values["workers"]["gpuType"]


def test_group_scheduling_and_nvlink_domain():
    groups = rendered(EXAMPLES[[p.stem for p in EXAMPLES].index("maverick-b200-disagg")]).one("RayCluster")
    groups = groups["spec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["maverick-prefill", "maverick-decode-0", "maverick-decode-1"]
    assert [g["template"]["spec"]["nodeSelector"]["garrison/pool"] for g in groups] == ["prefill", "decode", "decode"]
    values = read_values(EXAMPLES[[p.stem for p in EXAMPLES].index("maverick-b200-disagg")])
    values["models"][0]["sameNvlinkDomain"] = True
    cluster = parse(render_files(values)).one("RayCluster")
    for group in cluster["spec"]["workerGroupSpecs"]:
        [term] = group["template"]["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "nvidia.com/gpu.clique"
        assert term["labelSelector"]["matchLabels"]["garrison/worker-group"] == group["groupName"]
        assert group["template"]["metadata"]["labels"]["garrison/worker-group"] == group["groupName"]


@values_files
def test_ray_head_runs_no_ranks_and_every_ray_pod_has_probes_and_shared_memory(path):
    cluster = rendered(path).one("RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    # The engine cores run there (num_cpus=0 actors), the ranks never: no CPU or GPU slot to take.
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in json.dumps(head["template"]["spec"]["containers"][0]["resources"])
    for template in [head["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]:
        container = template["spec"]["containers"][0]
        # Probes of its own: KubeRay's defaults ask the Ray dashboard agent, which the image does not have.
        assert container["readinessProbe"]["tcpSocket"] and container["livenessProbe"]["tcpSocket"]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@values_files
def test_ray_head_mounts_the_store_read_only_for_the_engine_cores_and_no_kek(path):
    """The engine cores run on the head (garrison/serving/controller.py) and build their engines there from the
    store: the head mounts it read-only, with the claim the workers use; the data key comes from the controller in
    memory, so no KEK is mounted."""
    values, out = merged(path), rendered(path)
    config = yaml.safe_load(out.serve_config())
    spec = out.one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert values["store"]["enabled"]  # every example and the defaults use the store
    mount = mounts[config["store_dir"]]
    assert mount["readOnly"] is True
    claim = volumes[mount["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    worker = out.one("RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert claim == {v["name"]: v for v in worker["volumes"]}[mount["name"]]["persistentVolumeClaim"]
    assert "kek" not in volumes and not [m for m in mounts if m.startswith("/etc/garrison/kek")]
    assert not [v for v in volumes.values() if "secret" in v]


def ray_processes(out: Any) -> dict[str, dict[str, Any]]:
    """Every container that is a Ray node or attaches to the cluster as a driver, by a name for messages."""
    cluster = out.one("RayCluster")["spec"]
    containers = {"ray-head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in cluster["workerGroupSpecs"]:
        containers[group["groupName"]] = group["template"]["spec"]["containers"][0]
    for component in ("gateway", "controller"):
        containers[component] = out.one("Deployment", f"-{component}")["spec"]["template"]["spec"]["containers"][0]
    return containers


@values_files
def test_every_ray_process_presents_the_ray_token(path):
    """Ray's token authentication on every node and driver of the release, from one Secret: a process without the
    token cannot join the cluster or call an engine (the real Ray's check is tests/platform/test_ray_auth.py)."""
    values, out = merged(path), rendered(path)
    assert values["ray"]["auth"]["enabled"]  # on by default and in every example
    secret = values["ray"]["auth"]["existingSecret"] or f"{RELEASE}-ray-token"
    for name, container in ray_processes(out).items():
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}, name
    assert f"{secret} (key auth_token)" in out.notes


def test_ray_token_from_an_existing_secret_or_off():
    mine = parse(render_files({"ray": {"auth": {"existingSecret": "my-ray-token"}}}))
    for name, container in ray_processes(mine).items():
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "my-ray-token", name
    off = parse(render_files({"ray": {"auth": {"enabled": False}}}))
    for name, container in ray_processes(off).items():
        env = {e["name"]: e for e in container["env"]}
        # said outright: Ray would otherwise turn token mode on by itself where it finds a token file
        assert env["RAY_AUTH_MODE"]["value"] == "disabled" and "RAY_AUTH_TOKEN" not in env, name
    assert "ray-token" not in off.notes


def test_without_the_store_the_head_mounts_none():
    spec = parse(render_files({"store": {"enabled": False}})).one("RayCluster")["spec"]["headGroupSpec"]["template"]
    assert "store" not in {v["name"] for v in spec["spec"]["volumes"]}


@values_files
def test_processes_get_only_the_secrets_and_volumes_they_need(path):
    values, out = merged(path), rendered(path)
    config = yaml.safe_load(out.serve_config())
    assert config["ray_address"] == f"ray://{RELEASE}-head-svc.{NAMESPACE}.svc:10001"
    assert out.one("RayCluster")["metadata"]["name"] == RELEASE  # KubeRay names the head Service after it
    controller, gateway = out.one("Deployment", "-controller"), out.one("Deployment", "-gateway")
    assert controller["spec"]["replicas"] == 1 and controller["spec"]["strategy"]["type"] == "Recreate"

    def volumes(deployment):
        return {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}

    def mounts(deployment):
        return {m["mountPath"]: m for m in deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}

    assert mounts(controller)[config["kek_secret_dir"]]["readOnly"]
    assert volumes(controller)["kek"]["secret"]["items"] == [{"key": "kek", "path": "kek"}]
    assert mounts(controller)[config["store_dir"]]["readOnly"] and volumes(controller)["store"][
        "persistentVolumeClaim"]["readOnly"]
    assert "kek" not in volumes(gateway) and "store" not in volumes(gateway)
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GARRISON_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "url"
    assert set(env) <= {"GARRISON_DATABASE_URL", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    assert "database_url" not in config
    for group in out.one("RayCluster")["spec"]["workerGroupSpecs"]:
        worker_mounts = {m["mountPath"]: m for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert worker_mounts[config["store_dir"]]["readOnly"]
        assert "/etc/garrison/kek" not in worker_mounts
    if values["adminKey"]["enabled"]:
        assert mounts(gateway)["/etc/garrison/admin"]["readOnly"]
        assert config["admin_key_file"] == "/etc/garrison/admin/admin.key"


@values_files
def test_gateway_service_probes_budget_and_drain(path):
    values, out = merged(path), rendered(path)
    config = yaml.safe_load(out.serve_config())
    gateway = out.one("Deployment", "-gateway")
    spec = gateway["spec"]["template"]["spec"]
    if not values["gateway"]["autoscaling"]["enabled"]:
        assert gateway["spec"]["replicas"] >= 2
    else:
        assert out.one("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2 and "replicas" not in gateway["spec"]
    assert spec["terminationGracePeriodSeconds"] > config["gateway"]["drain_seconds"]
    [port] = out.one("Service", "-gateway")["spec"]["ports"]
    assert port["appProtocol"] == "grpc" and port["targetPort"] == "grpc"
    container = spec["containers"][0]
    listen_port = int(config["listen"].rsplit(":", 1)[1])
    assert {"name": "grpc", "containerPort": listen_port} in container["ports"]
    # The kubelet's gRPC probe cannot speak TLS: TLS or not, it asks the plaintext health-only port.
    health_port = int(config["gateway"]["health_listen"].rsplit(":", 1)[1])
    assert config["gateway"]["health_listen"] == f"0.0.0.0:{values['gateway']['healthPort']}"
    assert health_port != listen_port and {"name": "health", "containerPort": health_port} in container["ports"]
    assert container["readinessProbe"]["grpc"] == {"port": health_port, "service": "garrison.v1.Inference"}
    assert container["livenessProbe"]["grpc"] == container["startupProbe"]["grpc"] == {"port": health_port}
    assert not [p for p in ("readinessProbe", "livenessProbe", "startupProbe") if "tcpSocket" in container[p]]
    assert out.one("PodDisruptionBudget")["spec"]["selector"] == gateway["spec"]["selector"]
    controller = out.one("Deployment", "-controller")["spec"]["template"]["spec"]["containers"][0]
    health_port = int(config["controller"]["health_listen"].rsplit(":", 1)[1])
    assert controller["livenessProbe"]["grpc"]["port"] == controller["readinessProbe"]["grpc"]["port"] == health_port


def test_plaintext_grpc_only_when_tls_is_off_and_the_user_says_so():
    assert "insecure" not in yaml.safe_load(rendered(None).serve_config())
    with pytest.raises(helm.HelmError, match="gateway.insecure=true"):
        render_files({"gateway": {"tls": {"enabled": False}}})
    on = parse(render_files({"gateway": {"tls": {"enabled": False}, "insecure": True}}))
    config = yaml.safe_load(on.serve_config())
    assert config["insecure"] is True and "tls" not in config
    ignored = parse(render_files({"gateway": {"insecure": True}}))  # TLS on: insecure is not passed on
    assert "insecure" not in yaml.safe_load(ignored.serve_config())


@values_files
def test_import_jobs_are_the_only_writers_of_the_store(path):
    values, out = merged(path), rendered(path)
    jobs = out.of_kind("Job")
    assert len(jobs) == (len(values["modelImport"]["models"]) if values["modelImport"]["enabled"] else 0)
    for job, entry in zip(jobs, values["modelImport"]["models"]):
        spec = job["spec"]["template"]["spec"]
        env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
        assert env["MODEL"] == entry["name"]
        assert env["SOURCE"] == (f"/staging/{entry['path']}" if "path" in entry else entry["bundled"])
        script = spec["containers"][0]["args"][0]
        assert 'garrison models import "$SOURCE" --name "$MODEL" --store "$STORE"' in script
        assert "--kek-secret-dir /etc/garrison/kek" in script
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "readOnly" not in volumes["store"]["persistentVolumeClaim"]
        if "path" in entry:
            assert volumes["staging"]["persistentVolumeClaim"]["readOnly"]
    for where, template in out.pod_specs():
        if not where.startswith("Job/"):
            for volume in template["spec"].get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["readOnly"], where


# -- Security ------------------------------------------------------------------------------------------------------


@values_files
def test_every_pod_is_locked_down(path):
    for where, template in rendered(path).pod_specs():
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["readOnlyRootFilesystem"] is True, where
    [account] = rendered(path).of_kind("ServiceAccount")
    assert account["automountServiceAccountToken"] is False


@values_files
def test_images_by_tag_and_digest_from_the_one_registry(path):
    values, out = merged(path), rendered(path)
    registry = values["global"]["imageRegistry"]
    containers = [(where, c) for where, t in out.pod_specs() for c in t["spec"]["containers"]
                  + t["spec"].get("initContainers", [])]
    assert containers
    for where, container in containers:
        image = container["image"]
        assert container["imagePullPolicy"] == "IfNotPresent", where
        name, _, digest = image.partition("@")
        assert re.fullmatch(r".+:[A-Za-z0-9_][A-Za-z0-9_.-]*", name) and not name.endswith(":latest"), image
        if registry:
            assert image.startswith(registry + "/"), image
        if values["image"]["digest"]:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image
    if registry:
        for _, template in out.pod_specs():
            assert template["spec"]["imagePullSecrets"] == values["global"]["imagePullSecrets"]


def airgapped_examples() -> list[Path]:
    return [p for p in EXAMPLES if read_values(p).get("global", {}).get("imageRegistry")]


def test_the_airgapped_examples_exist():
    assert {p.stem for p in airgapped_examples()} == {"scout-h200", "maverick-b200-disagg"}


# -- NetworkPolicies -----------------------------------------------------------------------------------------------


def release_selector() -> dict[str, str]:
    return {"app.kubernetes.io/name": "garrison", "app.kubernetes.io/instance": RELEASE}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and In expressions, what the chart uses) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


@values_files
def test_default_deny_covers_every_pod_of_the_release(path):
    out = rendered(path)
    deny = out.one("NetworkPolicy", "-default-deny")["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    for where, template in out.pod_specs():
        assert selects(deny["podSelector"], template["metadata"]["labels"]), where


@pytest.mark.parametrize("path", airgapped_examples(), ids=value_id)
def test_airgapped_egress_goes_only_where_garrison_needs(path):
    values, out = merged(path), rendered(path)
    policy = values["networkPolicy"]
    dns = {"to": policy["dns"]["to"], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    release = {"to": [{"podSelector": {"matchLabels": release_selector()}}]}
    database = {"to": policy["database"]["to"], "ports": [{"protocol": "TCP", "port": policy["database"]["port"]}]}
    otlp = {"to": policy["otlp"]["to"], "ports": [{"protocol": "TCP", "port": policy["otlp"]["port"]}]}
    allowed = [dns, release, database] + ([otlp] if values["telemetry"]["otlpEndpoint"] else [])
    rules = [(p["metadata"]["name"], p["spec"]["podSelector"], rule)
             for p in out.of_kind("NetworkPolicy") for rule in p["spec"].get("egress", [])]
    assert sorted(json.dumps(r, sort_keys=True) for _, _, r in rules) == sorted(json.dumps(r, sort_keys=True)
                                                                                for r in allowed)
    for name, selector, rule in rules:
        assert rule.get("to"), f"{name}: an egress rule without `to` allows every destination"
        for peer in rule["to"]:
            assert peer.get("ipBlock", {}).get("cidr") not in ("0.0.0.0/0", "::/0"), name
        if rule == database:  # PostgreSQL: the gateways only
            assert selector["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    for p in out.of_kind("NetworkPolicy"):  # no policy reaches beyond the release's own pods
        assert p["spec"]["podSelector"]["matchLabels"].items() >= release_selector().items()


def test_clients_reach_only_the_gateway_port():
    """Not the health port: the kubelet probes it from the pod's own node, which NetworkPolicies always allow."""
    out = rendered(EXAMPLES[[p.stem for p in EXAMPLES].index("scout-h200")])
    [rule] = out.one("NetworkPolicy", "-gateway")["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 50051}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"garrison/client": "true"}}},
                            {"ipBlock": {"cidr": "10.20.0.0/16"}}]


# -- Monitoring ----------------------------------------------------------------------------------------------------


def test_monitoring_objects_only_where_the_cluster_serves_their_api():
    without = rendered(None, monitoring=False)
    assert not {o["kind"] for o in without.objects} & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    with_apis = rendered(None)
    monitor = with_apis.one("ServiceMonitor")
    metrics_service = with_apis.one("Service", "-gateway-metrics")
    assert selects(monitor["spec"]["selector"], metrics_service["metadata"]["labels"])
    assert not selects(monitor["spec"]["selector"], with_apis.one("Service", "-gateway")["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == metrics_service["spec"]["ports"][0]["name"] == "metrics"
    assert with_apis.one("PodMonitor") and with_apis.one("PrometheusRule")


def scrape(telemetry) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{telemetry.prometheus_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def exported_metric_names() -> set[str]:
    """What Garrison's telemetry really exports on /metrics, observed by scraping it: a gateway's, and a
    controller's (its replica rows and restarts, from a real Controller that has started nothing yet)."""
    from garrison.serving.config import ServeConfig, TelemetryConfig
    from garrison.serving.controller import Controller
    from garrison.telemetry import Telemetry

    telemetry = Telemetry(TelemetryConfig(prometheus_listen="127.0.0.1:0"))
    try:
        attributes = {"tenant": "a", "model": "m"}
        telemetry.observe_load(lambda: [({"model": "m"}, {"queue_depth": 1, "in_flight": 2, "kv_cache_usage": 0.5})])
        telemetry.ttft.record(0.1, attributes)
        telemetry.tpot.record(0.01, attributes)
        telemetry.requests.add(1, attributes | {"status": "OK"})
        telemetry.tokens.add(3, attributes | {"kind": "output"})
        telemetry.rejections.add(1, attributes | {"limit": "tokens_per_minute"})
        names = scrape(telemetry)
    finally:
        telemetry.shutdown()
    telemetry = Telemetry(TelemetryConfig(prometheus_listen="127.0.0.1:0"))
    try:  # as `garrison controller` wires it (garrison/cli/controller.py)
        controller = Controller(ServeConfig(), "unused", detached=False)
        telemetry.observe_load(controller.replica_rows)
        telemetry.observe_restarts(controller.restart_rows)
        controller_names = scrape(telemetry)
    finally:
        telemetry.shutdown()
    assert {"garrison_replicas", "garrison_replica_restarts_total"} <= controller_names
    return names | controller_names


def query_metric_names(expression: str) -> set[str]:
    import promql_parser

    promql_parser.parse(expression)  # raises on anything Prometheus would not parse
    return set(re.findall(r"\bgarrison_[a-z_]+", expression))


def test_alerts_parse_and_use_only_exported_metrics(exported_metric_names):
    rules = rendered(None).one("PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"GarrisonReplicaDown", "GarrisonModelUnavailable", "GarrisonTTFTHigh",
                                           "GarrisonTPOTHigh", "GarrisonKVCacheNearlyFull", "GarrisonQuotaRejections"}
    used = set()
    for rule in rules:
        used |= query_metric_names(rule["expr"])
        assert f'namespace="{NAMESPACE}"' in rule["expr"]
        if "garrison_replicas" in rule["expr"]:  # exported by the controller and by every gateway: never summed
            assert rule["expr"].startswith("max by"), rule["expr"]
    assert used <= exported_metric_names
    assert "garrison_time_to_first_token_seconds_bucket" in used and "garrison_kv_cache_usage" in used


def test_dashboard_is_the_ops_file_and_queries_exported_metrics(exported_metric_names):
    source = (ROOT / "ops" / "dashboards" / "garrison.json").read_text()
    shipped = rendered(None).one("ConfigMap", "-dashboard")["data"]["garrison.json"]
    assert json.loads(shipped) == json.loads(source)
    dashboard = json.loads(source)
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expression = target["expr"].replace("$__rate_interval", "5m").replace("$namespace", "ns")
            used |= query_metric_names(expression.replace("$model", ".*"))
    assert used <= exported_metric_names
    assert {"garrison_replicas", "garrison_rejections_total", "garrison_queue_depth"} <= used


def test_the_planners_helm_values_render(tmp_path: Path) -> None:
    """`garrison plan --helm-values` writes values this chart takes: Helm validates them against values.schema.json
    and renders the planned layout's worker groups."""
    from garrison.cli import main

    out = tmp_path / "values.yaml"
    assert main(["plan", "--model", "scout", "--hardware", "H200", "--rate", "2", "--prompt-tokens", "512",
                 "--output-tokens", "16", "--num-requests", "12", "--ttft-slo", "5", "--gpus", "8",
                 "--no-disaggregation", "--helm-values", str(out), "--source", "scout"]) == 0
    planned = read_values(out)["models"][0]
    ray = parse(render_files(read_values(out))).one("RayCluster")
    groups = [g for g in ray["spec"]["workerGroupSpecs"] if g["groupName"].startswith(planned["name"])]
    assert [g["replicas"] for g in groups] == [planned["replicas"]] * len(planned["groups"])
    assert all(g["numOfHosts"] == planned["numOfHosts"] for g in groups)
