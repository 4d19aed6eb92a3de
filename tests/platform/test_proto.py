"""The committed generated code is exactly what the .proto files produce."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "ops" / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_proto_files(tmp_path: Path) -> None:
    fresh = _load_generator().generate(tmp_path)
    committed_dir = ROOT / "platform" / "garrison" / "v1"
    fresh_names = {p.name for p in fresh}
    committed_names = {p.name for p in committed_dir.glob("*_pb2*.py*")}
    assert fresh_names == committed_names, "run `python ops/scripts/gen_proto.py` and commit the result"
    assert len(fresh_names) == 9
    for path in fresh:
        committed = (committed_dir / path.name).read_text()
        assert path.read_text() == committed, f"{path.name} is stale: run `python ops/scripts/gen_proto.py`"


def test_services_are_what_clients_expect() -> None:
    from garrison.v1 import admin_pb2, inference_pb2

    inference = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert {m.name for m in inference.methods} == {"Generate", "Tokenize", "ListModels", "GetUsage"}
    assert inference.methods_by_name["Generate"].server_streaming
    admin = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert {"CreateTenant", "CreateApiKey", "SetQuota", "GetUsage", "ListAuditEvents"} <= {m.name for m in admin.methods}
