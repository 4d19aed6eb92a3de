"""values.schema.json: in step with values.yaml (and with Garrison's engine settings), refusing each class of bad
values through Helm's own validator, and accepting exactly the layouts whose groups fit their pods."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import re

import helm_python as helm
import jsonschema
import pytest
import yaml
from chart_render import CHART, ROOT, VALUE_FILES, chart, read_values, render_files, value_id

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())


def generator():
    spec = importlib.util.spec_from_file_location("values_schema", ROOT / "helm" / "values_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schema_is_the_generators_output():
    assert (CHART / "values.schema.json").read_text() == generator().render(), \
        "run python helm/values_schema.py after changing it"


def closed_objects(schema, values, path=""):
    """(path, schema properties, values keys) of every closed object the defaults fill in."""
    if schema.get("additionalProperties") is False and isinstance(values, dict):
        yield path, set(schema["properties"]), set(values)
        for key, value in values.items():
            if key in schema["properties"]:
                yield from closed_objects(schema["properties"][key], value, f"{path}.{key}")


def test_values_yaml_and_schema_have_the_same_keys():
    pairs = list(closed_objects(SCHEMA, DEFAULTS))
    assert len(pairs) > 20
    for path, properties, keys in pairs:
        assert keys == properties, f"{path or 'values'}: only in values.yaml {keys - properties}, only in the " \
                                   f"schema {properties - keys}"


def is_section(schema) -> bool:
    """A closed object of the chart's own (not a Kubernetes object such as resources, passed through as given)."""
    return schema.get("additionalProperties") is False and any("additionalProperties" in p or "enum" in p or
                                                                p.get("type") != "object"
                                                                for p in schema["properties"].values())


def leaf_paths(schema, values, path=()):
    """Every value a user sets: a key whose schema is no section of its own (the models list is documented whole)."""
    for key, value in values.items():
        sub = schema["properties"][key]
        if is_section(sub) and isinstance(value, dict):
            yield from leaf_paths(sub, value, path + (key,))
        else:
            yield path + (key,)


def documented_paths() -> set[tuple[str, ...]]:
    """Keys of values.yaml with a comment right above them."""
    found, stack, previous = set(), [], ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if match:
            indent = len(match.group(1))
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, match.group(2))]
            if previous.lstrip().startswith("#"):
                found.add(tuple(k for _, k in stack))
        if line.strip():
            previous = line
    return found


def test_every_value_is_documented():
    undocumented = set(leaf_paths(SCHEMA, DEFAULTS)) - documented_paths()
    assert not undocumented, sorted(".".join(p) for p in undocumented)


def test_engine_settings_are_garrisons():
    from garrison.serving.settings import dtype_names
    from garrison_workers.engine.config import KERNEL_DTYPES, EngineConfig

    engine = SCHEMA["properties"]["models"]["items"]["properties"]["engine"]["properties"]
    assert set(engine) == {f.name for f in dataclasses.fields(EngineConfig)}
    # the dtype names a values file may give are those the engine's settings take
    assert set(engine["dtype"]["enum"]) == {*dtype_names({}), "auto"}
    assert set(engine["kernel_dtype"]["enum"]) == {*dtype_names({"dtypes": KERNEL_DTYPES}), None}


@pytest.mark.parametrize("path", VALUE_FILES, ids=value_id)
def test_defaults_and_examples_are_valid(path):
    chart().validate_schema(read_values(path))


def model(**overrides):
    base = {"name": "m", "source": "m", "groups": [{"role": "both", "tp": 2, "ep": 4}], "gpusPerPod": 8,
            "numOfHosts": 1, "engine": {"device": "cuda"}}
    return base | overrides


BAD = {
    "wrong type: replicas as a string": {"gateway": {"replicas": "2"}},
    "wrong type: a port as a float": {"gateway": {"port": 50051.5}},
    "health port out of range": {"gateway": {"healthPort": 70000}},
    "wrong type: tls.enabled as a string": {"gateway": {"tls": {"enabled": "yes"}}},
    "wrong type: nodeSelector value": {"workers": {"nodeSelector": {"pool": 1}}},
    "unknown key at the top": {"gatway": {}},
    "unknown key nested": {"gateway": {"tls": {"enable": True}}},
    "unknown key in a model": {"models": [model(replica=2)]},
    "unknown key in a group": {"models": [model(groups=[{"role": "both", "tp": 2, "ep": 4, "pp": 2}])]},
    "unknown engine setting": {"models": [model(engine={"kv_cache_size": 1})]},
    "tp zero": {"models": [model(groups=[{"role": "both", "tp": 0, "ep": 4}])]},
    "tp negative": {"models": [model(groups=[{"role": "both", "tp": -2, "ep": 4}])]},
    "tp fractional": {"models": [model(groups=[{"role": "both", "tp": 1.5, "ep": 4}])]},
    "tp a string": {"models": [model(groups=[{"role": "both", "tp": "2", "ep": 4}])]},
    "tp missing": {"models": [model(groups=[{"role": "both", "ep": 4}])]},
    "GPUs per pod do not fit tp x ep": {"models": [model(gpusPerPod=4)]},
    "hosts do not fit tp x ep": {"models": [model(numOfHosts=2)]},
    "one decode group does not fit": {"models": [model(groups=[{"role": "prefill", "tp": 2, "ep": 4},
                                                               {"role": "decode", "tp": 1, "ep": 4}])]},
    "more GPUs per pod than a node has": {"models": [model(gpusPerPod=16, groups=[{"role": "both", "tp": 16, "ep": 1}])]},
    "image tag latest": {"image": {"tag": "latest"}},
    "image digest not sha256": {"image": {"digest": "md5:abc"}},
    "pull policy Always": {"image": {"pullPolicy": "Always"}},
    "model name not a DNS label": {"models": [model(name="Scout_4")]},
    "role unknown": {"models": [model(groups=[{"role": "prefil", "tp": 2, "ep": 4}])]},
    "no models": {"models": []},
    "import entry with both a path and a bundled name": {"modelImport": {"models": [
        {"name": "m", "path": "m", "bundled": "smollm2"}]}},
    "import path escaping the staging volume": {"modelImport": {"models": [{"name": "m", "path": "../etc"}]}},
}


@pytest.mark.parametrize("values", BAD.values(), ids=BAD.keys())
def test_helm_refuses_bad_values(values):
    with pytest.raises(helm.HelmValuesError):
        chart().validate_schema(values)


def test_helm_template_enforces_the_schema():
    with pytest.raises(helm.HelmError, match="tp"):
        render_files({"models": [model(groups=[{"role": "both", "tp": 0, "ep": 4}])]})


def test_exactly_the_layouts_that_fit_are_accepted():
    """Against an independent validator (Python's jsonschema), random layouts within the schema's bounds: accepted
    exactly when every group's tp x ep is the pods' GPUs, gpusPerPod x numOfHosts."""
    validator = jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], **SCHEMA["properties"]["models"]["items"]})
    rng = random.Random(15)
    accepted = 0
    for _ in range(200):
        gpus, hosts = rng.randint(1, 8), rng.randint(1, 16)
        tp = rng.choice([d for d in range(1, gpus * hosts + 1) if (gpus * hosts) % d == 0] + [rng.randint(1, 9)])
        ep = rng.choice([(gpus * hosts) // tp if (gpus * hosts) % tp == 0 else 1, rng.randint(1, 16)])
        layout = model(groups=[{"role": "both", "tp": tp, "ep": ep}], gpusPerPod=gpus, numOfHosts=hosts)
        fits = tp * ep == gpus * hosts
        assert validator.is_valid(layout) == fits, (tp, ep, gpus, hosts)
        accepted += fits
    assert 40 < accepted < 160
