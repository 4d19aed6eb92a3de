"""Writes helm/garrison/values.schema.json, the JSON Schema Helm checks every install's values against.

The schema is generated because one rule cannot be written in JSON Schema by hand: every group of a model must fit
its pods, tp x ep = gpusPerPod x numOfHosts. JSON Schema has no multiplication, so the rule is spelled out as the
finite list of products the schema's bounds allow (gpusPerPod <= 8, numOfHosts <= 16). Every object is closed
(additionalProperties: false) except the Kubernetes maps passed through (resources, nodeSelector, affinity...).
values.yaml documents each value; tests/helm/test_values_schema.py keeps the two in step and checks this file is
this script's output.

    python helm/values_schema.py           # rewrite the schema
    python helm/values_schema.py --check   # exit 1 if the committed schema differs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).parent / "garrison" / "values.schema.json"
MAX_GPUS_PER_POD = 8
MAX_HOSTS = 16
ENGINE_INT = ["block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens", "attention_key_block"]
ENGINE_OPTIONAL_INT = ["num_kv_blocks", "max_model_len", "worker_threads"]
DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

Schema = dict[str, Any]


def obj(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    return schema | extra


def string(**extra: Any) -> Schema:
    return {"type": "string"} | extra


def integer(minimum: int | None = None, maximum: int | None = None) -> Schema:
    schema: Schema = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


BOOL: Schema = {"type": "boolean"}
MAP: Schema = {"type": "object"}  # a Kubernetes object passed through as given (affinity, securityContext...)
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
LIST: Schema = {"type": "array", "items": {"type": "object"}}
QUANTITY: Schema = {"type": ["string", "integer"], "pattern": "^[0-9]+(\\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|M|G|T|P)?$"}
RESOURCES: Schema = obj({"requests": MAP, "limits": MAP})  # a container's resources, checked by Kubernetes
PORT = integer(1, 65535)
SCHEDULING = {"nodeSelector": STRING_MAP, "tolerations": LIST, "affinity": MAP}


def engine() -> Schema:
    """garrison_workers.engine.config.EngineConfig, field by field (a test compares the names)."""
    properties: dict[str, Schema] = {name: integer(1) for name in ENGINE_INT}
    properties |= {name: {"type": ["integer", "null"], "minimum": 1} for name in ENGINE_OPTIONAL_INT}
    properties |= {
        "enable_prefix_caching": BOOL, "kv_transfer_checksum": BOOL, "async_scheduling": BOOL, "compile_decode": BOOL,
        "kv_transport": {"enum": ["ray", "torch"]},
        "dtype": {"enum": ["float32", "bfloat16", "float16", "auto"]},
        "kernel_dtype": {"enum": ["float32", "bfloat16", "float16", "int8", None]},
        "device": string(pattern="^(cpu|cuda(:[0-9]+)?)$"),
        "kv_cache_device": {"type": ["string", "null"], "pattern": "^(cpu|cuda(:[0-9]+)?)$"},
    }
    return obj(properties)


def group() -> Schema:
    return obj({"role": {"enum": ["both", "prefill", "decode"]}, "tp": integer(1), "ep": integer(1),
                "placement": {"enum": ["pack", "spread"]}, **SCHEDULING}, required=["role", "tp", "ep"])


def model() -> Schema:
    properties = {
        "name": string(pattern=DNS_LABEL, maxLength=30), "source": string(minLength=1), "replicas": integer(1),
        "engine": engine(), "groups": {"type": "array", "minItems": 1, "items": group()},
        "gpusPerPod": integer(1, MAX_GPUS_PER_POD), "numOfHosts": integer(1, MAX_HOSTS),
        "sameNvlinkDomain": BOOL, "resources": RESOURCES, "shmSize": QUANTITY, **SCHEDULING,
    }
    return obj(properties, required=["name", "source", "groups", "gpusPerPod", "numOfHosts"],
               allOf=[{"$ref": "#/$defs/groupsFitPods"}])


def fits() -> dict[str, Schema]:
    """$defs for: every group's tp x ep equals the model's gpusPerPod x numOfHosts (one branch per product)."""
    products = sorted({g * h for g in range(1, MAX_GPUS_PER_POD + 1) for h in range(1, MAX_HOSTS + 1)})
    branches = []
    for n in products:
        pods = [{"properties": {"gpusPerPod": {"const": g}, "numOfHosts": {"const": n // g}}}
                for g in range(1, MAX_GPUS_PER_POD + 1) if n % g == 0 and n // g <= MAX_HOSTS]
        ranks = [{"properties": {"tp": {"const": t}, "ep": {"const": n // t}}} for t in range(1, n + 1) if n % t == 0]
        branches.append({"anyOf": pods, "properties": {"groups": {"items": {"anyOf": ranks}}}})
    return {"groupsFitPods": {"$comment": "every group must fit the model's pods: tp x ep = gpusPerPod x numOfHosts",
                              "anyOf": branches}}


def network_policy() -> Schema:
    return obj({
        "enabled": BOOL,
        "clients": obj({"sameNamespace": BOOL, "namespaceSelectors": LIST,
                        "cidrs": {"type": "array", "items": string(pattern="^[0-9a-fA-F:.]+/[0-9]{1,3}$")}}),
        "database": obj({"to": LIST, "port": PORT}), "dns": obj({"to": LIST}),
        "monitoring": obj({"from": LIST}), "otlp": obj({"to": LIST, "port": PORT}),
    })


def monitoring() -> Schema:
    interval = string(pattern="^[0-9]+(ms|s|m|h)$")
    return obj({
        "serviceMonitor": obj({"enabled": BOOL, "interval": interval, "labels": STRING_MAP}),
        "podMonitor": obj({"enabled": BOOL, "interval": interval}),
        "prometheusRule": obj({"enabled": BOOL, "labels": STRING_MAP, "ttftP99Seconds": {"type": "number", "exclusiveMinimum": 0},
                               "tpotP99Seconds": {"type": "number", "exclusiveMinimum": 0},
                               "kvCacheUsage": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                               "rejectionsPerSecond": {"type": "number", "minimum": 0}}),
        "dashboard": obj({"enabled": BOOL, "labels": STRING_MAP}),
    })


def gateway() -> Schema:
    return obj({
        "replicas": integer(1), "port": PORT, "healthPort": PORT, "insecure": BOOL,
        "tls": obj({"enabled": BOOL, "existingSecret": string(), "clientCA": BOOL}),
        "maxConcurrentRpcs": integer(1), "maxQueuedPerTenant": integer(0), "drainSeconds": integer(0, 3600),
        "service": obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "port": PORT,
                        "annotations": STRING_MAP}),
        "resources": RESOURCES, "pdb": obj({"enabled": BOOL, "maxUnavailable": integer(0)}),
        "autoscaling": obj({"enabled": BOOL, "minReplicas": integer(1), "maxReplicas": integer(1),
                            "targetCPUUtilizationPercentage": integer(1, 100)}),
        **SCHEDULING,
    })


def schema() -> Schema:
    import_entry = obj({"name": string(pattern=DNS_LABEL, maxLength=30),
                        "path": string(pattern="^[^/.][^/]*(/[^/]+)*$", minLength=1), "bundled": string(minLength=1)},
                       required=["name"], oneOf=[{"required": ["path"]}, {"required": ["bundled"]}])
    properties = {
        "global": obj({"imageRegistry": string(pattern="^([a-zA-Z0-9.-]+(:[0-9]+)?(/[a-z0-9._/-]+)?)?$"),
                       "imagePullSecrets": {"type": "array", "items": obj({"name": string(minLength=1)}, ["name"])}}),
        "nameOverride": string(pattern="^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", maxLength=40),
        "fullnameOverride": string(pattern="^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", maxLength=40),
        "image": obj({"repository": string(pattern="^[a-z0-9]+([._/-][a-z0-9]+)*$"),
                      "tag": string(pattern="^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", **{"not": {"const": "latest"}}),
                      "digest": string(pattern="^(sha256:[a-f0-9]{64})?$"), "pullPolicy": {"const": "IfNotPresent"}},
                     required=["repository", "tag"]),
        "podAnnotations": STRING_MAP, "podLabels": STRING_MAP, "podSecurityContext": MAP,
        "containerSecurityContext": MAP,
        "serviceAccount": obj({"create": BOOL, "name": string(), "annotations": STRING_MAP}),
        "config": obj({"maxRequestBytes": integer(1), "clusterLostSeconds": integer(1),
                       "dataDir": string(pattern="^/")}),
        "telemetry": obj({"prometheusPort": PORT, "otlpEndpoint": string(), "serviceName": string(minLength=1)}),
        "ray": obj({"version": string(pattern="^[0-9]+\\.[0-9]+\\.[0-9]+$"),
                    "auth": obj({"enabled": BOOL, "existingSecret": string()}),
                    "head": obj({"resources": RESOURCES, "shmSize": QUANTITY, "rayStartParams": MAP, **SCHEDULING})}),
        "workers": obj({"gpuType": string(), "gpuTypeLabel": string(minLength=1), "gpuResource": string(minLength=1),
                        "nvlinkDomainLabel": string(minLength=1), "resources": RESOURCES, "shmSize": QUANTITY,
                        "rayStartParams": MAP, **SCHEDULING}),
        "models": {"type": "array", "minItems": 1, "items": model()},
        "controller": obj({"healthPort": PORT, "resources": RESOURCES, **SCHEDULING}),
        "gateway": gateway(),
        "database": obj({"existingSecret": string(), "key": string(minLength=1)}),
        "kek": obj({"existingSecret": string()}),
        "adminKey": obj({"enabled": BOOL, "existingSecret": string()}),
        "store": obj({"enabled": BOOL, "mountPath": string(pattern="^/"), "existingClaim": string(),
                      "size": QUANTITY, "storageClassName": string(), "accessModes": {
                          "type": "array", "minItems": 1,
                          "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
                      "signingKey": obj({"existingSecret": string()})}),
        "modelImport": obj({"enabled": BOOL, "models": {"type": "array", "items": import_entry},
                            "staging": obj({"existingClaim": string()}), "resources": RESOURCES,
                            "activeDeadlineSeconds": integer(1), "nodeSelector": STRING_MAP, "tolerations": LIST}),
        "networkPolicy": network_policy(),
        "monitoring": monitoring(),
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Garrison Helm chart values",
            **obj(properties), "$defs": fits()}


def render() -> str:
    return json.dumps(schema(), indent=1) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
