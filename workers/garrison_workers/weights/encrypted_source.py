"""A model in Garrison's encrypted store, read as a WeightSource (format: `store_format`).

Opening checks everything that can be checked before a byte is decrypted: the manifest's signature
against the signer the KEK vouched for, that it belongs to the data key's model, and that every
tensor file has exactly its recorded size. A read then fetches, with positioned reads, only the
records holding the rows asked for (one expert of a fused expert tensor, a column-parallel rank's
rows), and decrypts them straight into one preallocated tensor, several records at once on a small
thread pool. Memory beyond the returned tensor is one record-sized buffer per thread. Plaintext
never touches disk.

A record that fails authentication raises StoreIntegrityError naming the tensor, record and file;
the model being built is then abandoned (the loader returns nothing half-loaded).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from garrison_workers.config import ModelConfig, from_hf_config
from garrison_workers.errors import ModelLoadError, StoreIntegrityError
from garrison_workers.tokenizer import Tokenizer
from garrison_workers.weights.store_format import (
    NONCE_BYTES, RECORD_OVERHEAD, Record, StoreModel, TensorEntry, blob_aad, record_aad, verify_manifest)

CONFIG_BLOB = "config.json"


@dataclass(slots=True)
class VerifyResult:
    """What `EncryptedSource.verify` authenticated, and every record that failed."""

    num_tensors: int = 0
    num_records: int = 0
    num_bytes: int = 0  # plaintext bytes authenticated
    failures: list[str] = field(default_factory=list)


class EncryptedSource:
    def __init__(self, model: StoreModel) -> None:
        self.directory = Path(model.directory)
        self.manifest, _ = verify_manifest(self.directory, model.key)
        self._model_id = model.key.model_id
        self._aead = AESGCM(model.key.secret)
        self._tensors = {t.name: t for t in self.manifest.tensors}
        self._records: dict[str, list[Record]] = {}
        self._fds = self._open_files()
        self._close_fds = weakref.finalize(self, _close_all, list(self._fds.values()))
        self._threads = model.decrypt_threads or min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()  # each thread's ciphertext buffer, reused record after record
        self._count_lock = threading.Lock()
        self.bytes_read = 0  # bytes read from the tensor files (records whole: nonce, ciphertext, tag)
        # The last rows decrypted, while the caller still holds them: a fused expert is read as its
        # gate half, then its up half, and must be read and decrypted once.
        self._slab: tuple[tuple[str, int, int], weakref.ref[torch.Tensor]] | None = None

    # -- WeightSource -------------------------------------------------------------------------------

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def where(self, name: str) -> str:
        return f"the stored model {self.directory}"

    def read(self, name: str, index: Any = None) -> torch.Tensor:
        entry = self._tensors[name]
        records, local_index = self._records_for(entry, index)
        slab = self._decrypt_rows(entry, records)
        return slab if local_index is None else slab[local_index]

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        """Decrypt the whole tensor straight into `out` (a parameter), sparing a copy; False, with
        `out` untouched, when `out` does not have the stored shape and dtype or is not contiguous."""
        entry = self._tensors[name]
        if tuple(out.shape) != entry.shape or out.dtype != entry.torch_dtype or not out.is_contiguous() \
                or out.device.type != "cpu":
            return False
        self._decrypt_records(entry, self._records_of(entry), _byte_view(out))
        return True

    # -- config and tokenizer -----------------------------------------------------------------------

    def config(self) -> ModelConfig:
        try:
            return from_hf_config(json.loads(self._blob(CONFIG_BLOB)),
                                  source=f"the stored config.json of {self.directory}")
        except (ValueError, RecursionError) as err:
            raise ModelLoadError(f"the stored config.json of {self.directory} is not valid JSON ({err})") from None

    def tokenizer(self) -> Tokenizer | None:
        files = {b.name: self._blob(b.name) for b in self.manifest.blobs if b.name != CONFIG_BLOB}
        return Tokenizer.from_files(files, self.directory)

    # -- verification -------------------------------------------------------------------------------

    def verify(self) -> VerifyResult:
        """Authenticate every record and blob (into scratch memory), collecting every failure."""
        result = VerifyResult(num_tensors=len(self._tensors))
        for blob in self.manifest.blobs:
            try:
                result.num_bytes += len(self._blob(blob.name))
            except StoreIntegrityError as err:
                result.failures.append(str(err))
        jobs = [(entry, record) for entry in self._tensors.values() for record in self._records_of(entry)]

        def check(job: tuple[TensorEntry, Record]) -> str | None:
            entry, record = job
            try:
                self._decrypt_record(entry, record, self._buffer("plain", record.length))
            except StoreIntegrityError as err:
                return str(err)
            return None

        for error in self._map(check, jobs):
            result.failures += [error] if error else []
        result.num_records = len(jobs)
        result.num_bytes += sum(record.length for _, record in jobs)
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._close_fds()
        self._fds = {}

    # -- internals ----------------------------------------------------------------------------------

    def _open_files(self) -> dict[str, int]:
        fds: dict[str, int] = {}
        try:
            for entry in self.manifest.files:
                path = self.directory / entry.name
                try:
                    fds[entry.name] = fd = os.open(path, os.O_RDONLY)
                except OSError as err:
                    raise StoreIntegrityError(f"cannot open {path} ({err.strerror}); the stored model is incomplete: "
                                              "restore the file from backup or re-import the model") from None
                size = os.fstat(fd).st_size
                if size != entry.size:
                    what = "truncated" if size < entry.size else "extended"
                    raise StoreIntegrityError(
                        f"{path} is {size} bytes but the signed manifest records {entry.size}: the file was {what} "
                        "after import; restore it from backup or re-import the model")
        except BaseException:
            _close_all(list(fds.values()))
            raise
        return fds

    def _records_of(self, entry: TensorEntry) -> list[Record]:
        records = self._records.get(entry.name)
        if records is None:
            records = self._records[entry.name] = entry.records()
        return records

    def _records_for(self, entry: TensorEntry, index: Any) -> tuple[list[Record], Any]:
        """The records holding the rows of dim 0 that `index` selects, and `index` relative to them."""
        records = self._records_of(entry)
        if index is None or not entry.shape:
            return records, index
        index = index if isinstance(index, tuple) else (index,)
        first, rest, rows = index[0], index[1:], entry.num_rows
        if isinstance(first, int) and -rows <= first < rows:
            start, stop = first % rows, first % rows + 1
        elif isinstance(first, slice) and first.step in (None, 1):
            start, stop, _ = first.indices(rows)
            stop = max(start, stop)
        else:
            return records, index
        chosen = [r for r in records if r.row_start < stop and r.row_stop > start]
        base = chosen[0].row_start if chosen else 0
        local_first = first % rows - base if isinstance(first, int) else slice(start - base, stop - base)
        return chosen, (local_first, *rest)

    def _decrypt_rows(self, entry: TensorEntry, records: list[Record]) -> torch.Tensor:
        """Decrypt a run of records into one new tensor of the whole rows they cover."""
        row_start = records[0].row_start if records else 0
        row_stop = records[-1].row_stop if records else 0
        key = (entry.name, row_start, row_stop)
        cached = self._slab[1]() if self._slab is not None and self._slab[0] == key else None
        if cached is not None:
            return cached
        self._slab = None
        shape = (row_stop - row_start, *entry.shape[1:]) if entry.shape else ()
        out = torch.empty(shape, dtype=entry.torch_dtype)
        self._decrypt_records(entry, records, _byte_view(out))
        self._slab = (key, weakref.ref(out))
        return out

    def _decrypt_records(self, entry: TensorEntry, records: list[Record], out: Any) -> None:
        """Decrypt a run of records, each straight into its place in `out` (the bytes they cover)."""
        base = records[0].start if records else 0
        jobs = [(record, out[record.start - base:record.start - base + record.length]) for record in records]
        for _ in self._map(lambda job: self._decrypt_record(entry, *job), jobs):
            pass

    def _map(self, fn: Any, jobs: list[Any]) -> Iterable[Any]:
        """`fn` over `jobs` on the decrypt pool (in this thread when one job or one thread suffices)."""
        if len(jobs) <= 1 or self._threads == 1:
            return map(fn, jobs)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="garrison-decrypt")
        return self._pool.map(fn, jobs)

    def _decrypt_record(self, entry: TensorEntry, record: Record, out: Any) -> None:
        stored = self._read(entry.file, record.file_offset, record.stored_length)
        try:
            # On a bad tag `out` is left holding unauthenticated bytes: the error abandons it (and the
            # model being built) before anyone reads them.
            self._aead.decrypt_into(stored[:NONCE_BYTES], stored[NONCE_BYTES:], record_aad(self._model_id, entry, record), out)
        except InvalidTag:
            raise StoreIntegrityError(
                f"tensor {entry.name} (record {record.index}, {entry.file} bytes {record.file_offset}.."
                f"{record.file_offset + record.stored_length}) of stored model {self.directory.name!r} does not "
                "authenticate: the file was changed, or records were swapped between tensors or models; restore "
                "it from backup or re-import the model") from None

    def _blob(self, name: str) -> bytes:
        blob = next((b for b in self.manifest.blobs if b.name == name), None)
        if blob is None:
            raise StoreIntegrityError(f"stored model {self.directory} has no {name}; re-import the model")
        stored = self._read(blob.file, blob.offset, blob.length + RECORD_OVERHEAD)
        try:
            return self._aead.decrypt(bytes(stored[:NONCE_BYTES]), bytes(stored[NONCE_BYTES:]),
                                      blob_aad(self._model_id, blob))
        except InvalidTag:
            raise StoreIntegrityError(
                f"the stored {name} ({blob.file} bytes {blob.offset}..{blob.offset + blob.length + RECORD_OVERHEAD}) of model "
                f"{self.directory.name!r} does not authenticate: the file was changed; restore it or re-import") from None

    def _read(self, file: str, offset: int, length: int) -> memoryview:
        """`length` bytes at `offset` into this thread's reused buffer (a view valid until its next read)."""
        buffer = self._buffer("stored", length)
        got = os.preadv(self._fds[file], [buffer], offset)
        with self._count_lock:
            self.bytes_read += got
        if got != length:
            raise StoreIntegrityError(f"{self.directory / file} ends at byte {offset + got}, inside a record that "
                                      f"runs to {offset + length}: the file was truncated; restore it or re-import")
        return buffer

    def _buffer(self, kind: str, length: int) -> memoryview:
        buffer: bytearray | None = getattr(self._local, kind, None)
        if buffer is None or len(buffer) < length:
            buffer = bytearray(length)
            setattr(self._local, kind, buffer)
        return memoryview(buffer)[:length]


def _byte_view(tensor: torch.Tensor) -> Any:
    """A writable byte view of a contiguous CPU tensor's own memory."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

