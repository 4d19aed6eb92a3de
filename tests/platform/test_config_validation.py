"""`garrison serve --config FILE` and `garrison serve --check`: every problem of a file, each with its place, found
before anything starts; every engine setting reachable from YAML; the exposure rule for plaintext gRPC."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import socket
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from garrison.cli import main
from garrison.serving.config import ConfigError, EngineConfig, load
from garrison.serving.server import GarrisonServer


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return path


def problems(path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return {p.place: p.message for p in info.value.problems}


def check(*argv: str) -> tuple[int, str, str]:
    """`garrison serve --check ARGV` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["serve", "--check", *argv])
    return status, out.getvalue(), err.getvalue()


def test_every_problem_is_reported_with_its_place(tmp_path: Path) -> None:
    path = write(tmp_path, """
listen: 0.0.0.0:50051
gateway: {max_concurrent_rpcs: 0, drain_seconds: -1, health_listen: "50053"}
telemetry: {prometheus_listen: "9464"}
models:
  - name: a
    source: smollm2
    replicas: true
    groups: [{role: prefil, tp: "2"}, {tp: null}]
    engine: {dtype: fp8, max_num_seqs: 0, kv_transport: nccl, kv_cahce_bytes: 1}
  - name: b
    source: smollm2
    groups: {role: both}
  - [1, 2]
  - {source: smollm2}
  - {name: c, source: smollm2}
  - {name: c, source: smollm2}
  - {name: d, source: smollm2, engine: {device: gpu}}
kek_file: kek
kek_env: KEK
""")
    found = problems(path)
    assert found == {
        "config.listen": found["config.listen"],
        "config.gateway.max_concurrent_rpcs": "must be an integer >= 1, got 0",
        "config.gateway.drain_seconds": "must be a finite number >= 0, got -1",
        "config.gateway.health_listen": "must be HOST:PORT with a port from 0 to 65535, got '50053'",
        "config.telemetry.prometheus_listen": "must be HOST:PORT with a port from 0 to 65535, got '9464'",
        "config.models[0].replicas": "must be an integer >= 1, got true",
        "config.models[0].groups[0].role": "must be one of both, prefill, decode, got 'prefil'",
        "config.models[0].groups[0].tp": "must be an integer >= 1, got '2'",
        "config.models[0].groups[1].tp": "must be an integer >= 1, got null",
        "config.models[0].engine.dtype": "must be one of float32, bfloat16, float16 or auto, got 'fp8'",
        "config.models[0].engine.max_num_seqs": "must be an integer >= 1, got 0",
        "config.models[0].engine.kv_transport": "must be one of ray, torch, got 'nccl'",
        "config.models[0].engine.kv_cahce_bytes": "unknown setting (did you mean kv_cache_bytes?)",
        "config.models[1].groups": "must be a non-empty list, got a mapping",
        "config.models[2]": "must be a mapping of settings, got a list",
        "config.models[3].name": "is required",
        "config.models[5].name": "duplicate model name 'c' (models[4] has it too): names must differ",
        "config.models[6].engine.device": "must be cpu, cuda or cuda:N, got 'gpu'",
        "config.kek_env": "give at most one of kek_file, kek_env, kek_secret_dir (got kek_file, kek_env)",
    }
    assert "insecure: true" in found["config.listen"] and "tls" in found["config.listen"]


@pytest.mark.parametrize("text, place", [
    ("models: {name: m, source: smollm2}\n", "config.models"),  # a mapping where a list belongs
    ("telemetry: [1]\n", "config.telemetry"),  # a list where a mapping belongs
    ("engine: {}\n", "config.engine"),  # a model's setting at the top
    ("models: null\n", "config.models"),
    ("gateway: null\n", "config.gateway"),
    ("listen: null\n", "config.listen"),
    ("insecure: 'yes please'\n", "config.insecure"),
    ("max_request_bytes: 1.5\n", "config.max_request_bytes"),
    ("max_request_bytes: 99999999999999999999999\n", "config.max_request_bytes"),
    ("data_dir: ''\n", "config.data_dir"),
    ("models:\n  - {name: 'two words', source: smollm2}\n", "config.models[0].name"),
    ("models:\n  - {name: m, source: smollm2, engine: {max_model_len: -5}}\n", "config.models[0].engine.max_model_len"),
    ("models:\n  - {name: m, source: smollm2, engine: {kv_transfer_checksum: 1}}\n",
     "config.models[0].engine.kv_transfer_checksum"),
    ("listen: 127.0.0.1:50051\nlisten: 0.0.0.0:1\n", "config"),  # a key given twice
    ("models:\n  - {name: m, source: smollm2, engine: {dtype: int8}}\n", "config.models[0].engine.dtype"),
    ("models:\n  - {name: m, source: smollm2, engine: {kernel_dtype: int4}}\n",
     "config.models[0].engine.kernel_dtype"),
])
def test_types_nulls_and_ranges_are_checked(tmp_path: Path, text: str, place: str) -> None:
    found = problems(write(tmp_path, text))
    assert place in found or any(p.startswith(place) for p in found), found


def test_every_engine_setting_is_reachable_from_yaml(tmp_path: Path) -> None:
    """The engine's own EngineConfig is what the file builds, so a new engine setting needs no second copy here:
    each field, set to a value other than its default, arrives as given."""
    hints = typing.get_type_hints(EngineConfig)
    given: dict[str, typing.Any] = {}
    for f in dataclasses.fields(EngineConfig):
        hint, default = hints[f.name], f.default
        choices = [a for a in typing.get_args(hint) if a is not type(None)]
        if f.name == "device":
            given[f.name] = "cuda:1"
        elif f.name == "kv_cache_device":
            given[f.name] = "cpu"
        elif hint is torch.dtype or torch.dtype in choices:
            given[f.name] = "bfloat16"
        elif hint is bool:
            given[f.name] = not default
        elif typing.get_origin(hint) is typing.Literal:
            given[f.name] = next(c for c in choices if c != default)
        else:
            given[f.name] = (default or 1) + 7
    path = write(tmp_path, yaml.safe_dump({"models": [{"name": "m", "source": "smollm2", "engine": given}]}))
    engine = load(path).models[0].engine
    expected = EngineConfig(**{**given, "dtype": torch.bfloat16, "kernel_dtype": torch.bfloat16})
    assert engine == expected
    assert all(getattr(engine, f.name) != f.default for f in dataclasses.fields(EngineConfig))


def test_int8_activations_are_a_kernel_dtype(tmp_path: Path) -> None:
    """int8 names a8_mm's activations (kernel_dtype), never a model's dtype."""
    path = write(tmp_path, "models:\n  - {name: m, source: smollm2, engine: {dtype: auto, kernel_dtype: int8}}\n")
    assert load(path).models[0].engine.kernel_dtype == torch.int8
    found = problems(write(tmp_path, "models:\n  - {name: m, source: smollm2, engine: {dtype: int8}}\n"))
    assert found == {"config.models[0].engine.dtype": "must be one of float32, bfloat16, float16 or auto, got 'int8'"}


def test_the_embedded_default_keeps_its_small_engine() -> None:
    config = load(None)
    assert [m.name for m in config.models] == ["smollm2"]
    assert (config.models[0].engine.kv_cache_bytes, config.models[0].engine.max_num_seqs) == (512 << 20, 32)
    assert config.listen == "127.0.0.1:50051" and not config.insecure and config.admin_key_file is None
    assert (config.gateway.max_concurrent_rpcs, config.gateway.max_queued_per_tenant,
            config.gateway.drain_seconds) == (1024, 256, 30.0)


@pytest.mark.parametrize("listen, extra, refused", [
    ("0.0.0.0:50051", "", True),
    ("[::]:50051", "", True),
    ("10.1.2.3:50051", "", True),
    ("gateway.internal:50051", "", True),
    (":50051", "", True),  # every interface
    ("0.0.0.0:50051", "insecure: true\n", False),
    ("0.0.0.0:50051", "tls: {cert: c.pem, key: k.pem}\n", False),
    ("127.0.0.1:50051", "", False),
    ("127.9.9.9:50051", "", False),
    ("[::1]:50051", "", False),
    ("localhost:50051", "", False),
])
def test_plaintext_grpc_off_loopback_needs_insecure(tmp_path: Path, listen: str, extra: str, refused: bool) -> None:
    path = write(tmp_path, f"listen: '{listen}'\n{extra}")
    if refused:
        assert "plaintext gRPC" in problems(path)["config.listen"]
    else:
        assert load(path).listen == listen
    assert load(None, listen=listen, insecure=True).insecure  # the flag: `garrison serve --insecure`


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_check_reports_busy_ports_missing_models_and_files_as_json(tmp_path: Path) -> None:
    (tmp_path / "admin.key").write_text("not a key\n")
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with busy_port() as grpc_port, busy_port() as metrics_port, busy_port() as health_port:
        path = write(tmp_path, f"""
listen: 127.0.0.1:{grpc_port}
telemetry: {{prometheus_listen: '127.0.0.1:{metrics_port}'}}
gateway: {{health_listen: '127.0.0.1:{health_port}'}}
admin_key_file: admin.key
tls: {{cert: cert.pem, key: missing.pem}}
models:
  - {{name: here, source: smollm2}}
  - {{name: gone, source: ./no/such/dir}}
  - {{name: unknown, source: nosuchmodel}}
  - {{name: imported, source: fresh, import_from: ./nowhere.gguf}}
""")
        status, out, _ = check("--config", str(path), "--json")
        assert check("--config", str(path), "--static")[0] == 0  # the file itself is valid
    report = json.loads(out)
    assert status == 1 and report["ok"] is False
    found = {p["place"]: p["message"] for p in report["problems"]}
    assert set(found) == {"config.listen", "config.telemetry.prometheus_listen", "config.gateway.health_listen",
                          "config.admin_key_file",
                          "config.tls.cert", "config.tls.key", "config.models[1].source", "config.models[2].source",
                          "config.models[3].import_from"}, found
    assert "cannot listen" in found["config.listen"] and "gk_" in found["config.admin_key_file"]
    assert "not a PEM certificate" in found["config.tls.cert"] and "nosuchmodel" in found["config.models[2].source"]


def test_the_gateways_health_port_is_a_port_of_its_own(tmp_path: Path) -> None:
    """gateway.health_listen (plaintext gRPC health for probes) is null by default, may listen off loopback without
    `insecure` (it serves health only), and may not be the gRPC port itself."""
    assert load(None).gateway.health_listen is None
    tls = "tls: {cert: c.pem, key: k.pem}\n"
    config = load(write(tmp_path, tls + "listen: 0.0.0.0:50051\ngateway: {health_listen: 0.0.0.0:50053}\n"))
    assert config.gateway.health_listen == "0.0.0.0:50053" and not config.insecure
    for listen, health in (("0.0.0.0:50051", "127.0.0.1:50051"), ("127.0.0.1:50051", "127.0.0.1:50051"),
                           ("[::]:50051", "0.0.0.0:50051")):
        found = problems(write(tmp_path, tls + f"listen: '{listen}'\ngateway: {{health_listen: '{health}'}}\n"))
        assert "port of its own" in found.get("config.gateway.health_listen", ""), (listen, health, found)
    assert load(write(tmp_path, tls + "listen: 127.0.0.1:0\ngateway: {health_listen: 127.0.0.1:0}\n"))


def test_check_passes_a_good_file_and_names_each_problem_of_a_bad_one(tmp_path: Path) -> None:
    good = write(tmp_path, "listen: 127.0.0.1:0\nmodels:\n  - {name: m, source: smollm2}\n")
    status, out, _ = check("--config", str(good))
    assert status == 0 and "OK" in out
    status, out, _ = check("--config", str(good), "--json")
    assert status == 0 and json.loads(out) == {"ok": True, "problems": []}
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [\n")
    status, out, _ = check("--config", str(bad), "--json")
    assert status == 1 and "not valid YAML" in json.loads(out)["problems"][0]["message"]
    status, _, err = check("--config", str(tmp_path / "absent.yaml"))
    assert status == 1 and err.startswith("garrison: error: ") and "cannot read the config file" in err


def test_a_busy_port_stops_the_server_before_ray_starts(tmp_path: Path) -> None:
    import ray

    with busy_port() as port:
        path = write(tmp_path, f"listen: 127.0.0.1:{port}\ndata_dir: data\nmodels:\n  - {{name: m, source: smollm2}}\n")
        server = GarrisonServer(load(path))
        with pytest.raises(ConfigError, match=f"config.listen: cannot listen on 127.0.0.1:{port}"):
            import asyncio

            asyncio.run(server.start())
    assert not ray.is_initialized() and server.tenancy is None
