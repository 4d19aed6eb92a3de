"""A store directory of encrypted models: list them, open one for the workers, verify, re-key.

    <store>/signing-key.pem   Ed25519 key that signs manifests at import (mode 0600; or kept elsewhere
                              with `models import --signing-key`)
    <store>/<name>/           one model (see garrison_workers.weights.store_format)

Opening a model unwraps its data key with the KEK provider and checks the manifest's signature
before any worker is started; each worker checks it again when it opens the files itself.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from garrison.paths import default_data_dir
from garrison_workers.errors import StoreIntegrityError, WeightStoreError
from garrison_workers.weights.encrypted_source import EncryptedSource, VerifyResult
from garrison_workers.weights.store_format import DATA_KEY_FILE, MANIFEST_FILE, Manifest, StoreModel, verify_manifest

from garrison.weight_store.keys import (
    KeyProvider, WrappedDataKey, require, unwrap_data_key, wrap_data_key, write_secret_file)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SIGNING_KEY_FILE = "signing-key.pem"


def default_store_dir() -> Path:
    """`store/` inside Garrison's data directory (garrison.paths: $GARRISON_DATA_DIR, else ~/.local/share/garrison)."""
    return default_data_dir() / "store"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise WeightStoreError(f"{name!r} is not a valid model name: use up to 128 letters, digits, '.', '_' "
                               "and '-', starting with a letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """What `models list` shows; read without any key."""

    name: str
    model_id: str
    architecture: str
    num_parameters: int
    num_tensors: int
    stored_bytes: int
    kek_id: str
    created: str
    source: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    @property
    def signing_key_path(self) -> Path:
        return self.root / SIGNING_KEY_FILE

    def model_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def has(self, name: str) -> bool:
        return bool(_NAME.match(name)) and (self.root / name / MANIFEST_FILE).is_file()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir() if self.has(entry.name))

    def summary(self, name: str) -> ModelSummary:
        directory = self._existing(name)
        manifest = Manifest.from_bytes(_read(directory / MANIFEST_FILE), directory / MANIFEST_FILE)
        wrapped = WrappedDataKey.read(directory / DATA_KEY_FILE)
        return ModelSummary(name, manifest.model_id, manifest.architecture, manifest.num_parameters,
                            len(manifest.tensors), sum(f.size for f in manifest.files), wrapped.kek_id,
                            manifest.created, manifest.source)

    def open(self, name: str, provider: KeyProvider | None, decrypt_threads: int = 0) -> StoreModel:
        """The model with its data key, for the loader and the workers, after checking key and signature."""
        directory = self._existing(name)
        provider = require(provider, f"model {name!r} in {self.root} is encrypted")
        key = unwrap_data_key(provider, WrappedDataKey.read(directory / DATA_KEY_FILE), name)
        verify_manifest(directory, key)
        return StoreModel(directory, key, decrypt_threads)

    def verify(self, name: str, provider: KeyProvider | None, decrypt_threads: int = 0) -> VerifyResult:
        """Check the key, the signature, every file's size and every record's tag."""
        source = EncryptedSource(self.open(name, provider, decrypt_threads))
        try:
            return source.verify()
        finally:
            source.close()

    def rotate_kek(self, old: KeyProvider, new: KeyProvider, names: list[str] | None = None) -> list[str]:
        """Rewrap each model's data key from `old` to `new`; tensor files and manifests are untouched.

        Every data key is unwrapped before any file is written, so a model the old KEK cannot open
        stops the rotation with nothing changed. Models already under `new` are skipped, so an
        interrupted rotation can be run again.
        """
        new_id = new.key_id()
        if old.key_id() == new_id:
            raise WeightStoreError(f"the new KEK ({new.describe()}) is the old one (KEK id {new_id}); "
                                   "create a new one with `garrison keys create-kek FILE`")
        pending = []
        for name in names if names is not None else self.names():
            path = self._existing(name) / DATA_KEY_FILE
            wrapped = WrappedDataKey.read(path)
            if wrapped.kek_id == new_id:
                unwrap_data_key(new, wrapped, name)  # proves it, rather than trusting the recorded id
                continue
            pending.append((path, unwrap_data_key(old, wrapped, name), name))
        for path, key, _ in pending:
            write_secret_file(path, wrap_data_key(new, key.model_id, key.signer, key.secret).to_bytes(), replace=True)
        return [name for _, _, name in pending]

    def _existing(self, name: str) -> Path:
        directory = self.model_dir(name)
        if not (directory / MANIFEST_FILE).is_file():
            held = ", ".join(self.names()) or "nothing"
            raise WeightStoreError(f"the store {self.root} has no model {name!r} (it holds {held}); "
                                   "import one with `garrison models import SRC --name NAME`")
        return directory


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise StoreIntegrityError(f"cannot read {path}: {err.strerror}") from None
