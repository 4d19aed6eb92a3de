"""Hostile model directories and GGUF files are refused with a ModelLoadError that names the file and the key
(or tensor), before anything large is allocated. GGUF files are written with the `gguf` package's writer; a
config.json is a transformers save_pretrained directory with one value changed."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import save_tiny_llama
from garrison_workers.errors import ModelLoadError
from garrison_workers.loader import build_model, open_model_files
from garrison_workers.tokenizer import _bytes_to_unicode

VOCAB, HIDDEN, HEADS, KV_HEADS, FF = 64, 16, 2, 1, 32


def load(path: Path) -> None:
    files = open_model_files(path)
    build_model(files.config, files.source)


# -- GGUF ------------------------------------------------------------------------------------------------


def write_gguf(path: Path, metadata: dict[str, Any] | None = None, skip: tuple[str, ...] = (),
               tokens: list[Any] | None = None, hidden: int = HIDDEN) -> Path:
    """A complete one-layer dense Llama GGUF (F32 tensors, byte-level BPE tokenizer), with `metadata` overriding
    the llama.* values (a value's Python type picks its GGUF type) and the keys in `skip` left out."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    values: dict[str, Any] = {"llama.block_count": 1, "llama.context_length": 64, "llama.embedding_length": HIDDEN,
                              "llama.feed_forward_length": FF, "llama.attention.head_count": HEADS,
                              "llama.attention.head_count_kv": KV_HEADS, "llama.vocab_size": VOCAB,
                              "llama.attention.layer_norm_rms_epsilon": 1e-5}
    values.update(metadata or {})
    for key, value in values.items():
        if key in skip:
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    writer.add_tokenizer_model("gpt2")
    alphabet = list(_bytes_to_unicode().values())
    default_tokens = alphabet[:VOCAB - 3] + ['!"', "<s>", "</s>"]
    writer.add_array("tokenizer.ggml.tokens", tokens if tokens is not None else default_tokens)
    writer.add_token_merges(['! "'])
    writer.add_bos_token_id(VOCAB - 2)
    writer.add_eos_token_id(VOCAB - 1)
    shapes = {"token_embd.weight": (VOCAB, hidden), "output_norm.weight": (hidden,), "output.weight": (VOCAB, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (KV_HEADS * hidden // HEADS, hidden),
              "blk.0.attn_v.weight": (KV_HEADS * hidden // HEADS, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (FF, hidden), "blk.0.ffn_up.weight": (FF, hidden),
              "blk.0.ffn_down.weight": (hidden, FF)}
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def claim_array_length(path: Path, key: str, length: int) -> Path:
    """Rewrite the item count of the array `key` (after the key: its value type, item type, then the count)."""
    data = bytearray(path.read_bytes())
    at = data.index(key.encode()) + len(key) + 8
    struct.pack_into("<Q", data, at, length)
    path.write_bytes(data)
    return path


def test_a_well_formed_gguf_loads_and_generates(tmp_path: Path) -> None:
    """The baseline every hostile file below is one change away from."""
    from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
    from garrison_workers.engine.sequence import SamplingParams

    engine = LLMEngine.from_path(write_gguf(tmp_path / "ok.gguf"), EngineConfig(kv_cache_bytes=1 << 20))
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert sum(len(o.new_token_ids) for o in outputs) == 3


GGUF_CASES = {
    "string where a count belongs": (dict(metadata={"llama.embedding_length": "16"}), "llama.embedding_length"),
    "zero heads": (dict(metadata={"llama.attention.head_count": 0}), "llama.attention.head_count"),
    "absurd layer count": (dict(metadata={"llama.block_count": 5000}), "llama.block_count"),
    "absurd width": (dict(metadata={"llama.embedding_length": 1 << 30}), "llama.embedding_length"),
    "missing width": (dict(skip=("llama.embedding_length",)), "llama.embedding_length"),
    "non-finite epsilon": (dict(metadata={"llama.attention.layer_norm_rms_epsilon": float("nan")}),
                           "llama.attention.layer_norm_rms_epsilon"),
    "tensors of another width": (dict(hidden=8), "token_embd.weight"),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_hostile_gguf_metadata_is_refused_naming_file_and_key(tmp_path: Path, case: str) -> None:
    kwargs, key = GGUF_CASES[case]
    path = write_gguf(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(ModelLoadError) as info:
        load(path)
    assert str(path) in str(info.value) and key in str(info.value), str(info.value)


def test_a_gguf_array_claiming_a_huge_length_is_refused_at_once(tmp_path: Path) -> None:
    """The gguf reader walks a claimed length item by item: 2**40 tokens must be refused before it starts."""
    path = claim_array_length(write_gguf(tmp_path / "m.gguf"), "tokenizer.ggml.tokens", 1 << 40)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load(path)
    assert time.perf_counter() - started < 5
    message = str(info.value)
    assert str(path) in message and "tokenizer.ggml.tokens" in message and str(1 << 40) in message


def test_a_gguf_tensor_past_the_end_of_the_file_is_named(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:-64])  # the last tensor (ffn_down) loses its tail
    with pytest.raises(ModelLoadError) as info:
        load(path)
    assert str(path) in str(info.value) and "blk.0.ffn_down.weight" in str(info.value), str(info.value)


def test_gguf_tokenizer_metadata_of_the_wrong_type_is_a_model_error(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", tokens=list(range(VOCAB)))  # token ids where their text belongs
    with pytest.raises(ModelLoadError) as info:
        load(path)
    assert str(path) in str(info.value) and "tokenizer" in str(info.value), str(info.value)


# -- Hugging Face directories ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def with_config(tiny_dir: Path, target: Path, change: Any) -> Path:
    """A copy of the tiny model whose config.json is `change(config)`."""
    target.mkdir()
    for file in tiny_dir.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    config = json.loads((tiny_dir / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(change(config)))
    return target


CONFIG_CASES = {
    "text where a number belongs": (lambda c: {**c, "hidden_size": "64"}, "hidden_size"),
    "a list where a number belongs": (lambda c: {**c, "hidden_size": [64]}, "hidden_size"),
    "absurd width": (lambda c: {**c, "hidden_size": 10**12}, "hidden_size"),
    "negative layer count": (lambda c: {**c, "num_hidden_layers": -1}, "num_hidden_layers"),
    "zero heads": (lambda c: {**c, "num_attention_heads": 0}, "num_attention_heads"),
    "true as a count": (lambda c: {**c, "intermediate_size": True}, "intermediate_size"),
    "missing vocabulary size": (lambda c: {k: v for k, v in c.items() if k != "vocab_size"}, "vocab_size"),
    "rope parameters as text": (lambda c: {**c, "rope_parameters": "llama3"}, "rope_parameters"),
    "eos as text": (lambda c: {**c, "eos_token_id": "</s>"}, "eos_token_id"),
    "infinite epsilon": (lambda c: {**c, "rms_norm_eps": 1e999}, "rms_norm_eps"),
    "a list at the top": (lambda c: [c], "JSON object"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_hostile_config_json_is_refused_naming_file_and_key(tiny_dir: Path, tmp_path: Path, case: str) -> None:
    change, key = CONFIG_CASES[case]
    model = with_config(tiny_dir, tmp_path / "model", change)
    with pytest.raises(ModelLoadError) as info:
        load(model)
    assert str(model / "config.json") in str(info.value) and key in str(info.value), str(info.value)


def test_a_safetensors_index_cannot_point_outside_its_directory(tiny_dir: Path, tmp_path: Path) -> None:
    """A shard name is a file of the model's directory, never a path to some other file."""
    model = with_config(tiny_dir, tmp_path / "model", lambda c: c)
    (model / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    names = load_file(tmp_path / "elsewhere.safetensors").keys()
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: "../elsewhere.safetensors" for name in names}}))
    with pytest.raises(ModelLoadError) as info:
        load(model)
    assert "model.safetensors.index.json" in str(info.value) and "../elsewhere.safetensors" in str(info.value)


def test_a_safetensors_header_that_lies_about_a_shape_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    model = with_config(tiny_dir, tmp_path / "model", lambda c: c)
    raw = (model / "model.safetensors").read_bytes()
    size = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8:8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [1 << 20, 1 << 20]  # far more than its byte range holds
    text = json.dumps(header).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    with pytest.raises(ModelLoadError) as info:
        load(model)
    assert str(model / "model.safetensors") in str(info.value)


def test_a_config_far_larger_than_its_weights_is_refused_before_allocating(tiny_dir: Path, tmp_path: Path) -> None:
    """Widths within the bounds but ~40 GB of parameters over a few-MB checkpoint: the shapes are compared on
    meta tensors first. Run under an address-space limit of 2 GiB more than the process already maps, so an
    allocation of the config's size would fail instead of being refused."""
    model = with_config(tiny_dir, tmp_path / "model", lambda c: {**c, "hidden_size": 8192, "intermediate_size": 1 << 20,
                                                                 "head_dim": 16})
    script = textwrap.dedent(f"""
        import resource
        import torch
        from garrison_workers.errors import ModelLoadError
        from garrison_workers.loader import build_model, open_model_files
        vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY))
        try:
            files = open_model_files({str(model)!r})
            build_model(files.config, files.source)
            print("LOADED")
        except ModelLoadError as err:
            print("REFUSED", err)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith("REFUSED"), done.stdout + done.stderr[-3000:]
    assert str(model / "model.safetensors") in done.stdout and "model.embed_tokens.weight" in done.stdout
