"""The on-disk format of Garrison's encrypted weight store, shared by the importer and the readers.

A stored model is one directory:

    manifest.json      what is stored where (plaintext metadata: names, shapes, dtypes, offsets)
    manifest.sig       Ed25519 signature of manifest.json's exact bytes
    datakey.json       the model's data key, wrapped by a key-encryption key (KEK); mode 0600
    tensors-NNNNN.bin  records, back to back, nothing else: nonce (12) | AES-256-GCM ciphertext | tag (16)

Invariants the readers rely on:
- A tensor's records tile its C-contiguous bytes in order. A record covers whole rows of dim 0, or
  one piece of a single row when a row is larger than the record size, so any range of rows is a
  contiguous run of records. Each expert of a fused expert tensor (dim 0 = experts) is its own row,
  hence its own records: an expert-parallel rank reads and decrypts only its experts.
- Every record is authenticated with associated data binding the model id, the tensor's name,
  dtype and shape, and the record's index and byte range (`record_aad`). A record moved to another
  place, tensor or model no longer decrypts.
- The data key is wrapped with associated data binding the model id and the manifest signer's
  public key (`data_key_context`): whoever holds the KEK vouches for the signer, so the signature
  is checked against a key the KEK authenticated, not against one an attacker could swap in.
- Config and tokenizer files travel as encrypted blobs, one record each.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from garrison_workers.errors import StoreIntegrityError

FORMAT = "garrison-store/1"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
DATA_KEY_FILE = "datakey.json"
NONCE_BYTES, TAG_BYTES = 12, 16
RECORD_OVERHEAD = NONCE_BYTES + TAG_BYTES
DEFAULT_RECORD_BYTES = 4 << 20  # bounds each decrypt thread's buffer; big tensors split for parallel decrypt
# Fused expert tensors, float or in their canonical quantized parts (payload, scales, zeros).
_EXPERT_TENSOR = re.compile(r"\.experts\.(gate_up_proj|down_proj)(_int4|_int8|_fp8|_fp8_dynamic|_scale|_zero)?$")
DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2",
    "int8", "uint8", "int16", "int32", "int64", "bool")}


def tensor_file_name(index: int) -> str:
    return f"tensors-{index:05d}.bin"


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype} cannot be stored; supported: {', '.join(DTYPES)}")
    return name


def is_expert_tensor(name: str) -> bool:
    """A fused expert tensor, [num_experts, ...]: stored one expert per record."""
    return _EXPERT_TENSOR.search(name) is not None


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# -- keys, as a worker receives them --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataKey:
    """A model's unwrapped data key and the manifest signer the KEK vouched for with it.

    The platform unwraps it with the KEK provider and hands it to each worker in memory (Ray actor
    arguments); it is never written to disk or logged, and its repr leaves the secret out.
    """

    model_id: str
    signer: bytes  # raw Ed25519 public key that must have signed the manifest
    secret: bytes = field(repr=False)  # the AES-256-GCM data key


@dataclass(frozen=True, slots=True)
class StoreModel:
    """A model of the encrypted store as the loader opens it: its directory and its data key."""

    directory: Path
    key: DataKey
    decrypt_threads: int = 0  # 0: one per core, at most 4

    def __str__(self) -> str:  # names the model, never the key
        return f"{self.directory} (encrypted store)"


# -- the manifest -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """A small file (config.json, tokenizer.json...) stored as one encrypted record."""

    name: str
    file: str
    offset: int
    length: int  # plaintext bytes


@dataclass(frozen=True, slots=True)
class Record:
    index: int
    start: int  # byte offset of its plaintext within the tensor
    length: int  # plaintext bytes
    row_start: int  # rows of dim 0 it covers (part of one row when that row is split in pieces)
    row_stop: int
    file_offset: int  # where its nonce starts in the tensor file

    @property
    def stored_length(self) -> int:
        return self.length + RECORD_OVERHEAD


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int  # first record's file offset; the others follow back to back
    record_rows: int  # rows of dim 0 per record (1 when rows are split in pieces)
    row_pieces: int  # records per row (1 unless a row exceeds the record size)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES or any(n < 0 for n in self.shape) or self.record_rows < 1 or self.row_pieces < 1 \
                or (self.row_pieces > 1 and self.record_rows != 1):
            raise ValueError(f"invalid tensor entry {self.name!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def num_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.torch_dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_bytes

    def records(self) -> list[Record]:
        rows, row_bytes = self.num_rows, self.row_bytes
        spans: list[tuple[int, int, int, int]] = []  # start, length, row_start, row_stop
        if self.row_pieces == 1:
            for r0 in range(0, rows, self.record_rows):
                r1 = min(rows, r0 + self.record_rows)
                spans.append((r0 * row_bytes, (r1 - r0) * row_bytes, r0, r1))
        else:
            piece = -(-row_bytes // self.row_pieces)
            spans = [(r * row_bytes + p, min(piece, row_bytes - p), r, r + 1)
                     for r in range(rows) for p in range(0, row_bytes, piece)]
        records, offset = [], self.offset
        for i, (start, length, r0, r1) in enumerate(spans):
            records.append(Record(i, start, length, r0, r1, offset))
            offset += length + RECORD_OVERHEAD
        return records

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_length for r in self.records())


def plan_records(shape: tuple[int, ...], itemsize: int, per_expert: bool, record_bytes: int) -> tuple[int, int]:
    """(record_rows, row_pieces) for a tensor: whole rows up to `record_bytes`, one expert per row group
    for fused expert tensors, and rows larger than `record_bytes` cut into pieces."""
    row_bytes = math.prod(shape[1:]) * itemsize
    if row_bytes > record_bytes:
        return 1, -(-row_bytes // record_bytes)
    if per_expert:
        return 1, 1
    return max(1, record_bytes // max(row_bytes, 1)), 1


@dataclass(frozen=True, slots=True)
class Manifest:
    model_id: str
    name: str
    created: str
    source: str
    architecture: str
    num_parameters: int
    files: tuple[FileEntry, ...]
    blobs: tuple[BlobEntry, ...]
    tensors: tuple[TensorEntry, ...]
    format: str = FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps({
            "format": self.format, "model_id": self.model_id, "name": self.name, "created": self.created,
            "source": self.source, "architecture": self.architecture, "num_parameters": self.num_parameters,
            "files": [{"name": f.name, "size": f.size} for f in self.files],
            "blobs": [{"name": b.name, "file": b.file, "offset": b.offset, "length": b.length} for b in self.blobs],
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "file": t.file, "offset": t.offset,
                         "record_rows": t.record_rows, "row_pieces": t.row_pieces} for t in self.tensors],
        }, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: Path) -> "Manifest":
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise StoreIntegrityError(f"{where} is in store format {raw.get('format')!r}; this Garrison reads "
                                          f"{FORMAT!r}: re-import the model with this version")
            return cls(
                model_id=str(raw["model_id"]), name=str(raw["name"]), created=str(raw["created"]),
                source=str(raw["source"]), architecture=str(raw["architecture"]),
                num_parameters=int(raw["num_parameters"]),
                files=tuple(FileEntry(str(f["name"]), int(f["size"])) for f in raw["files"]),
                blobs=tuple(BlobEntry(str(b["name"]), str(b["file"]), int(b["offset"]), int(b["length"]))
                            for b in raw["blobs"]),
                tensors=tuple(TensorEntry(str(t["name"]), str(t["dtype"]), tuple(int(n) for n in t["shape"]),
                                          str(t["file"]), int(t["offset"]), int(t["record_rows"]),
                                          int(t["row_pieces"])) for t in raw["tensors"]))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise StoreIntegrityError(f"{where} is not a valid store manifest ({type(err).__name__}: {err}); "
                                      "re-import the model") from None


# -- associated data --------------------------------------------------------------------------------


def record_aad(model_id: str, tensor: TensorEntry, record: Record) -> bytes:
    return canonical_json({"format": FORMAT, "model": model_id, "kind": "tensor", "name": tensor.name,
                           "dtype": tensor.dtype, "shape": list(tensor.shape), "record": record.index,
                           "start": record.start, "length": record.length})


def blob_aad(model_id: str, blob: BlobEntry) -> bytes:
    return canonical_json({"format": FORMAT, "model": model_id, "kind": "file", "name": blob.name,
                           "length": blob.length})


def data_key_context(model_id: str, signer: bytes) -> bytes:
    """Associated data of the wrapped data key: which model, and whose signature its manifest carries."""
    return canonical_json({"format": FORMAT, "model": model_id, "kind": "data-key", "signer": signer.hex()})


def verify_manifest(directory: Path, key: DataKey) -> tuple[Manifest, bytes]:
    """The manifest (and its exact bytes) after checking its signature against the KEK-vouched signer."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    manifest_path, signature_path = directory / MANIFEST_FILE, directory / SIGNATURE_FILE
    try:
        data, signature = manifest_path.read_bytes(), signature_path.read_bytes()
    except OSError as err:
        raise StoreIntegrityError(f"cannot read {err.filename}: {err.strerror}; the stored model "
                                  f"{directory.name!r} is incomplete: re-import it") from None
    try:
        Ed25519PublicKey.from_public_bytes(key.signer).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise StoreIntegrityError(
            f"{manifest_path} does not match its signature {SIGNATURE_FILE}: the manifest was edited or "
            "re-signed after import; restore it from backup or re-import the model") from None
    manifest = Manifest.from_bytes(data, manifest_path)
    if manifest.model_id != key.model_id:
        raise StoreIntegrityError(f"{manifest_path} is the manifest of model id {manifest.model_id}, but the data "
                                  f"key belongs to model id {key.model_id}: files of two stored models were mixed")
    return manifest, data
