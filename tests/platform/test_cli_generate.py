"""`garrison generate` as a user runs it: JSON output, and a clear error with non-zero exit for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import save_tiny_llama4


def garrison(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "garrison", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama4(tmp_path_factory.mktemp("tiny"), seed=1)


def test_json_output_with_token_ids(tiny_dir: Path) -> None:
    result = garrison("generate", "--model", str(tiny_dir), "--token-ids", "5,6,7,8", "--max-new-tokens", "5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == len(out["logprobs"]) == 5
    assert all(lp <= 0 for lp in out["logprobs"])
    assert out["finish_reason"] == "length" and out["prompt_tokens"] == 4


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def broken_models(tiny_dir: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each broken model and a phrase its error message must contain."""
    unknown = copy_model(tiny_dir, tmp_path / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(dict(config, model_type="gpt2", architectures=["GPT2LMHeadModel"])))
    missing_file = copy_model(tiny_dir, tmp_path / "missing_file")
    (missing_file / "model.safetensors").unlink()
    corrupt = copy_model(tiny_dir, tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = copy_model(tiny_dir, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    missing_tensor = copy_model(tiny_dir, tmp_path / "missing_tensor")
    tensors = load_file(missing_tensor / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, missing_tensor / "model.safetensors", metadata={"format": "pt"})
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 100)
    return {
        "unknown architecture": (unknown, "unsupported architecture 'GPT2LMHeadModel'"),
        "missing weight file": (missing_file, "model.safetensors"),
        "truncated weight file": (corrupt, "model.safetensors"),
        "garbage weight file": (garbage, "model.safetensors"),
        "missing tensor": (missing_tensor, "model.layers.1.self_attn.k_proj.weight"),
        "no such path": (tmp_path / "nowhere", "no file or directory"),
        "corrupt gguf": (bad_gguf, "not a readable GGUF file"),
    }


def assert_clean_failure(result: subprocess.CompletedProcess[str], phrase: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("garrison: error:"), result.stderr
    assert phrase in result.stderr, result.stderr


def test_broken_models_are_refused_clearly(tiny_dir: Path, tmp_path: Path) -> None:
    for case, (model, phrase) in broken_models(tiny_dir, tmp_path).items():
        result = garrison("generate", "--model", str(model), "--token-ids", "5,6,7")
        assert_clean_failure(result, phrase)


@pytest.mark.parametrize("args, phrase", [
    (["--token-ids", ""], "prompt is empty"),
    (["--token-ids", "5,99999"], "outside the vocabulary"),
    (["--token-ids", ",".join(["5"] * 5000)], "shorten the prompt"),
    (["--token-ids", "5", "--max-new-tokens", "0"], "max_tokens must be"),
    (["--token-ids", "5", "--temperature", "nan"], "temperature must be"),
    (["--token-ids", "5", "--top-p", "0"], "top_p must be"),
    (["--prompt", "hello"], "no tokenizer"),
])
def test_bad_requests_are_refused_clearly(tiny_dir: Path, args: list[str], phrase: str) -> None:
    assert_clean_failure(garrison("generate", "--model", str(tiny_dir), *args), phrase)


def test_parallel_layout_gives_the_same_tokens(tiny_dir: Path) -> None:
    args = ["generate", "--model", str(tiny_dir), "--token-ids", "5,6,7,8,9", "--max-new-tokens", "6", "--json"]
    single = garrison(*args)
    parallel = garrison(*args, "--tp", "2", "--ep", "2")
    assert parallel.returncode == 0, parallel.stderr
    assert json.loads(parallel.stdout)["token_ids"] == json.loads(single.stdout)["token_ids"]
