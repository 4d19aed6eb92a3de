"""`models import`: encrypt a model (HF directory or GGUF file) into the store, once.

The model is read through the same loaders the engine uses, so the store holds tensors under
Garrison's names, exactly as the engine would load them: quantized checkpoints (GGUF Q4_0/Q4_1/Q8_0,
compressed-tensors) in their canonical quantized form (`garrison_workers.quant`: payloads and scales are
records like any tensor), everything else as stored. `quantize` rounds a float model's block weights to
int8 or int4 on the way in (`quantize_rtn`). One tensor is in memory at a time. The model is written to a
hidden directory and renamed into place only when complete.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tqdm import tqdm

from garrison_workers.errors import WeightStoreError
from garrison_workers.loader import open_model_files
from garrison_workers.quant.codec import quantize_rtn
from garrison_workers.quant.formats import FORMATS, holds_quantized, num_codes
from garrison_workers.tokenizer import PRETRAINED_FILES
from garrison_workers.weights.gguf_source import hf_config_from_gguf, open_reader
from garrison_workers.weights.store_format import (
    DATA_KEY_FILE, DEFAULT_RECORD_BYTES, MANIFEST_FILE, NONCE_BYTES, RECORD_OVERHEAD, SIGNATURE_FILE, BlobEntry, FileEntry, Manifest,
    TensorEntry, blob_aad, dtype_name, is_expert_tensor, plan_records, record_aad, tensor_file_name)

from garrison.weight_store.keys import (
    KeyProvider, load_or_create_signing_key, public_bytes, require, wrap_data_key, write_secret_file)
from garrison.weight_store.store import ModelSummary, Store, check_name

DEFAULT_SHARD_BYTES = 4 << 30  # a tensor file is closed once it holds this much (a larger tensor gets its own)


def import_model(src: Path, store: Store, name: str, provider: KeyProvider | None, *,
                 signing_key: Path | None = None, progress: bool = True,
                 record_bytes: int = DEFAULT_RECORD_BYTES, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 quantize: str | None = None) -> ModelSummary:
    final = store.model_dir(check_name(name))
    if final.exists():
        raise WeightStoreError(f"the store {store.root} already holds a model named {name!r}; choose another "
                               f"--name, or remove {final} first")
    provider = require(provider, "importing encrypts the model under a key-encryption key")
    provider.key_id()  # fails now, not after encrypting the whole model, when the KEK is missing
    if quantize not in (None, "int8", "int4"):
        raise WeightStoreError(f"--quantize {quantize!r}: choose int8 or int4")
    # Quantizing reads the float weights (a GGUF file's blocks dequantized); rounding already-rounded codes again
    # would only add error.
    files = open_model_files(src, keep_quantized=quantize is None)
    if quantize is not None and holds_quantized(files.source.names()):
        raise WeightStoreError(f"{src} is already quantized; import it as it is (without --quantize)")
    config, tokenizer_files = _portable_metadata(Path(src), files)
    signer = load_or_create_signing_key(signing_key or store.signing_key_path)
    store.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    model_id = uuid.uuid4().hex
    temp = store.root / f".importing-{name}-{model_id[:8]}"
    temp.mkdir(mode=0o700)
    try:
        data_key = AESGCM.generate_key(bit_length=256)
        writer = _RecordWriter(temp, AESGCM(data_key), shard_bytes)
        blobs = [writer.blob(model_id, blob_name, content)
                 for blob_name, content in {"config.json": json.dumps(config).encode(), **tokenizer_files}.items()]
        tensors = _write_tensors(writer, files.source, model_id, record_bytes, name, progress, quantize)
        manifest = Manifest(
            model_id=model_id, name=name, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            source=Path(src).name, architecture=files.config.architecture,
            num_parameters=sum(_num_parameters(t) for t in tensors), files=tuple(writer.close()), blobs=tuple(blobs),
            tensors=tuple(tensors)).to_bytes()
        _write(temp / MANIFEST_FILE, manifest)
        _write(temp / SIGNATURE_FILE, signer.sign(manifest))
        write_secret_file(temp / DATA_KEY_FILE, wrap_data_key(provider, model_id, public_bytes(signer), data_key).to_bytes())
        try:
            os.rename(temp, final)
        except OSError:
            raise WeightStoreError(f"{final} appeared while {name!r} was being imported (another import?); "
                                   "choose another --name") from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return store.summary(name)


def _num_parameters(entry: TensorEntry) -> int:
    """Weights a tensor stands for: a quantized payload's codes (two per int4 byte), nothing for scales and zeros."""
    kind = next((k for k in FORMATS if entry.name.endswith(f"_{k}")), None)
    if kind is not None:
        return num_codes(entry.shape, kind)
    return 0 if entry.name.endswith(("_scale", "_zero")) else math.prod(entry.shape)


def _portable_metadata(src: Path, files) -> tuple[dict, dict[str, bytes]]:
    """The config as a transformers config.json dict, and the tokenizer's files, to store encrypted."""
    if src.is_file():  # GGUF: both live in its metadata
        tokenizer = files.tokenizer.to_files() if files.tokenizer is not None else {}
        return hf_config_from_gguf(open_reader(src), src), tokenizer
    config = json.loads((src / "config.json").read_text())
    if not (src / "tokenizer.json").is_file():
        return config, {}
    return config, {name: (src / name).read_bytes() for name in PRETRAINED_FILES if (src / name).is_file()}


def _write_tensors(writer: "_RecordWriter", source, model_id: str, record_bytes: int, name: str,
                   progress: bool, quantize: str | None = None) -> list[TensorEntry]:
    names = list(source.names())
    entries, total = [], 0
    with tqdm(total=len(names), desc=f"importing {name}", unit="tensor", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for tensor_name in names:
            tensor = source.read(tensor_name).contiguous()
            for stored_name, stored in _quantized(tensor_name, tensor, quantize):
                entries.append(writer.tensor(model_id, stored_name, stored.contiguous(), record_bytes))
                total += stored.nbytes
            bar.set_postfix_str(f"{total / 1e9:.2f} GB", refresh=False)
            bar.update()
    return entries


# The blocks' matrices; embeddings, the LM head, routers and norms stay as they are (the planner's assumption).
_QUANTIZABLE = re.compile(r"^model\.layers\.\d+\..*(_proj\.weight|experts\.(gate_up_proj|down_proj))$")
INT4_GROUPS = (128, 64, 32)


def _quantized(name: str, tensor: torch.Tensor, kind: str | None) -> list[tuple[str, torch.Tensor]]:
    """The tensors to store for `name`: itself, or its canonical quantized form under `kind`."""
    if kind is None or not _QUANTIZABLE.match(name) or not tensor.is_floating_point():
        return [(name, tensor)]
    if is_expert_tensor(name):  # fused experts are [E, in, out]; quantized weights are out-major like a linear's
        tensor = tensor.transpose(-1, -2)
    in_features = tensor.shape[-1]
    group = in_features if kind == "int8" else next((g for g in INT4_GROUPS if in_features % g == 0), None)
    if group is None:
        return [(name, tensor)]  # no int4 group fits (a width not a multiple of 32): kept in float
    payload, scale, zero = quantize_rtn(tensor, kind, group)
    parts = [(f"{name}_{kind}", payload), (f"{name}_scale", scale)]
    return parts + ([(f"{name}_zero", zero)] if zero is not None else [])


@dataclass(slots=True)
class _RecordWriter:
    """Appends records to tensor files, starting a new file past `shard_bytes`; a tensor never spans two."""

    directory: Path
    aead: AESGCM
    shard_bytes: int
    files: list[FileEntry] = field(default_factory=list)
    _handle: BinaryIO | None = None
    _offset: int = 0

    def blob(self, model_id: str, name: str, content: bytes) -> BlobEntry:
        file, offset = self._place(len(content) + RECORD_OVERHEAD)
        entry = BlobEntry(name, file, offset, len(content))
        self._record(content, blob_aad(model_id, entry))
        return entry

    def tensor(self, model_id: str, name: str, tensor: torch.Tensor, record_bytes: int) -> TensorEntry:
        shape = tuple(tensor.shape)
        rows, pieces = plan_records(shape, tensor.element_size(), is_expert_tensor(name), record_bytes)
        entry = TensorEntry(name, dtype_name(tensor.dtype), shape, "", 0, rows, pieces)
        file, offset = self._place(entry.stored_bytes)
        entry = TensorEntry(name, entry.dtype, shape, file, offset, rows, pieces)
        plain = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else memoryview(b"")
        for record in entry.records():
            self._record(plain[record.start:record.start + record.length], record_aad(model_id, entry, record))
        return entry

    def close(self) -> list[FileEntry]:
        self._finish_file()
        return self.files

    def _place(self, nbytes: int) -> tuple[str, int]:
        if self._handle is None or (self._offset and self._offset + nbytes > self.shard_bytes):
            self._finish_file()
            self._handle = open(self.directory / tensor_file_name(len(self.files)), "xb")
            self._offset = 0
        return tensor_file_name(len(self.files)), self._offset

    def _record(self, plain, aad: bytes) -> None:
        assert self._handle is not None
        nonce = os.urandom(NONCE_BYTES)  # random per record; a data key is never reused across imports
        ciphertext = self.aead.encrypt(nonce, plain, aad)
        self._handle.write(nonce)
        self._handle.write(ciphertext)
        self._offset += len(nonce) + len(ciphertext)

    def _finish_file(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self.files.append(FileEntry(tensor_file_name(len(self.files)), self._offset))
            self._handle = None


def _write(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
