"""The encrypted weight store, end to end: import, load (ep=1 and ep=2 on a local Ray), refusals, rotation, CLI.

Everything here is real: safetensors written by transformers, the SmolLM2 GGUF, AES-GCM and Ed25519
from `cryptography`, files on disk, a local Ray instance for the expert-parallel group.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import save_tiny_llama4
from garrison.cli import main
from garrison.weight_store.importer import import_model
from garrison.weight_store.keys import (
    EnvKeyProvider, FileKeyProvider, SecretDirKeyProvider, WrappedDataKey, create_kek_file)
from garrison.weight_store.store import Store
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.errors import (
    KeyUnavailableError, LayoutError, StoreIntegrityError, WeightStoreError, WrongKeyError)
from garrison_workers.loader import build_model, open_model_files
from garrison_workers.parallel.context import ParallelContext
from garrison_workers.parallel.dims import ParallelDims
from garrison_workers.weights.encrypted_source import EncryptedSource
from garrison_workers.weights.store_format import (
    DATA_KEY_FILE, MANIFEST_FILE, SIGNATURE_FILE, Manifest, StoreModel, TensorEntry, is_expert_tensor)

ENGINE = EngineConfig(block_size=4, max_num_batched_tokens=16, num_kv_blocks=128)
NEW_TOKENS = 12
# Small records and tensor files, so that tensors span several records, rows split into pieces
# (each expert of gate_up_proj is 24 KiB) and the model spans several files.
RECORD_BYTES, SHARD_BYTES = 8 << 10, 128 << 10
SMOLLM2_ENGINE = EngineConfig(kv_cache_bytes=64 << 20, max_num_batched_tokens=512)  # a prompt in one step


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    # Six experts per MoE layer: ep=2 gives each rank three.
    return save_tiny_llama4(tmp_path_factory.mktemp("moe"), seed=5, num_local_experts=6, num_experts_per_tok=2,
                            interleave_moe_layer_step=2, num_hidden_layers=4)


@pytest.fixture(scope="module")
def kek(tmp_path_factory) -> FileKeyProvider:
    return create_kek_file(tmp_path_factory.mktemp("keys") / "kek")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_moe: Path, kek: FileKeyProvider) -> Store:
    store = Store(tmp_path_factory.mktemp("store") / "store")
    import_model(tiny_moe, store, "tiny", kek, record_bytes=RECORD_BYTES, shard_bytes=SHARD_BYTES, progress=False)
    return store


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return torch.randint(3, 512, (23,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def reference_tokens(tiny_moe: Path, prompt: list[int]) -> list[int]:
    return greedy(LLMEngine.from_path(tiny_moe, ENGINE), prompt)


def greedy(engine: LLMEngine, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    try:
        [done] = engine.generate([prompt], SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    finally:
        engine.shutdown()
    return done.token_ids


def manifest_of(directory: Path) -> Manifest:
    return Manifest.from_bytes((directory / MANIFEST_FILE).read_bytes(), directory)


def copy_store(store: Store, destination: Path) -> Store:
    shutil.copytree(store.root, destination)
    return Store(destination)


# -- loading gives the original model ----------------------------------------------------------------


def test_store_loads_bit_identical_weights_and_the_same_tokens(tiny_moe, store, kek, prompt, reference_tokens) -> None:
    original = open_model_files(tiny_moe)
    stored = open_model_files(store.open("tiny", kek))
    assert stored.config == original.config
    expected = build_model(original.config, original.source).state_dict()
    got = build_model(stored.config, stored.source).state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert greedy(LLMEngine.from_path(store.open("tiny", kek), ENGINE), prompt) == reference_tokens


@pytest.mark.usefixtures("local_ray")
def test_store_at_ep2_on_ray_gives_the_same_tokens(store, kek, prompt, reference_tokens) -> None:
    engine = LLMEngine.from_path(store.open("tiny", kek), ENGINE, ParallelDims(ep=2))
    assert greedy(engine, prompt) == reference_tokens


def test_ep2_rank_reads_only_its_experts(store, kek) -> None:
    manifest = manifest_of(store.model_dir("tiny"))
    expert = [t for t in manifest.tensors if is_expert_tensor(t.name)]
    non_expert_bytes = sum(t.stored_bytes for t in manifest.tensors if not is_expert_tensor(t.name))
    expert_bytes = sum(t.stored_bytes for t in expert)
    assert expert_bytes > non_expert_bytes / 4  # the bound below means something

    def rank_reads(rank: int, dims: ParallelDims) -> int:
        source = EncryptedSource(store.open("tiny", kek))
        config = open_model_files(store.open("tiny", kek)).config
        build_model(config, source, par=ParallelContext(dims, rank))  # no process group is needed to load
        return source.bytes_read

    assert rank_reads(0, ParallelDims()) == non_expert_bytes + expert_bytes
    for rank in (0, 1):
        own = range(3 * rank, 3 * rank + 3)  # default placement: experts 0-2 on rank 0, 3-5 on rank 1
        own_bytes = sum(r.stored_length for t in expert for r in t.records() if r.row_start in own)
        read = rank_reads(rank, ParallelDims(ep=2))
        assert read == non_expert_bytes + own_bytes  # every record once: gate and up halves share one read
        assert read <= non_expert_bytes + expert_bytes / 2


def test_smollm2_from_the_store_matches_the_gguf(tmp_path: Path, smollm2_path: Path, smollm2_engine, kek) -> None:
    store = Store(tmp_path / "store")
    import_model(smollm2_path, store, "smollm2", kek, progress=False)
    engine = LLMEngine.from_path(store.open("smollm2", kek), SMOLLM2_ENGINE)
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert text == smollm2_engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    assert prompt == smollm2_engine.tokenizer.encode(text, add_special_tokens=False)
    assert engine.tokenizer.eos_token_ids == smollm2_engine.tokenizer.eos_token_ids
    params = SamplingParams(max_tokens=10)
    [ours], [theirs] = engine.generate([prompt], params), smollm2_engine.generate([prompt], params)
    assert ours.token_ids == theirs.token_ids and ours.text == theirs.text
    assert "Paris" in ours.text
    # SmolLM2 is dense: ep=2 is refused alike (before any worker starts), whichever way it is loaded.
    with pytest.raises(LayoutError, match="ep=2 needs experts"):
        LLMEngine.from_path(store.open("smollm2", kek), ENGINE, ParallelDims(ep=2))


# -- refusals ---------------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def record_at(manifest: Manifest, file: str, offset: int) -> TensorEntry | None:
    """The tensor whose records hold byte `offset` of `file` (None: a config/tokenizer blob)."""
    for tensor in manifest.tensors:
        if tensor.file == file and tensor.offset <= offset < tensor.offset + tensor.stored_bytes:
            return tensor
    return None


def secrets_of(store: Store, kek: FileKeyProvider) -> list[str]:
    """Every spelling of the KEK and the data key that an error or output must never contain."""
    data_key = store.open("tiny", kek).key.secret
    kek_bytes = kek._kek()
    return [form for key in (data_key, kek_bytes)
            for form in (key.hex(), base64.b64encode(key).decode(), repr(key)[2:-1], key.hex().upper())]


def load(store: Store, provider) -> None:
    """What a server does with a model name: open it with the KEK and build the engine."""
    LLMEngine.from_path(store.open("tiny", provider), ENGINE).shutdown()


def assert_refused(store: Store, provider, error: type[Exception], *phrases: str, secrets: list[str]) -> str:
    with pytest.raises(error) as caught:
        load(store, provider)
    message = str(caught.value)
    for phrase in phrases:
        assert phrase in message, message
    assert not any(secret in message for secret in secrets), "an error message contains key bytes"
    return message


def test_a_flipped_byte_anywhere_in_any_tensor_file_is_refused(store, kek, tmp_path: Path) -> None:
    secrets = secrets_of(store, kek)
    manifest = manifest_of(store.model_dir("tiny"))
    assert len(manifest.files) >= 3
    for file in manifest.files:
        for offset in (0, file.size // 2, file.size - 1):  # a nonce, somewhere inside, a tag
            broken = copy_store(store, tmp_path / f"{file.name}-{offset}")
            flip_byte(broken.model_dir("tiny") / file.name, offset)
            tensor = record_at(manifest, file.name, offset)
            named = tensor.name if tensor is not None else "config.json"
            assert_refused(broken, kek, StoreIntegrityError, named, file.name, "does not authenticate", secrets=secrets)


def swap_ranges(path_a: Path, start_a: int, path_b: Path, start_b: int, length: int) -> None:
    data_a, data_b = bytearray(path_a.read_bytes()), bytearray(path_b.read_bytes())
    chunk_a, chunk_b = bytes(data_a[start_a:start_a + length]), bytes(data_b[start_b:start_b + length])
    data_a[start_a:start_a + length] = chunk_b
    data_b = data_a if path_a == path_b else data_b
    data_b[start_b:start_b + length] = chunk_a
    path_a.write_bytes(bytes(data_a))
    if path_b != path_a:
        path_b.write_bytes(bytes(data_b))


def test_swapped_ciphertexts_are_refused(store, kek, tmp_path: Path) -> None:
    secrets = secrets_of(store, kek)
    tensors = {t.name: t for t in manifest_of(store.model_dir("tiny")).tensors}
    # Two tensors of the same shape: the whole of one in place of the other, and back.
    a, b = tensors["model.layers.0.self_attn.q_proj.weight"], tensors["model.layers.2.self_attn.q_proj.weight"]
    assert a.stored_bytes == b.stored_bytes
    broken = copy_store(store, tmp_path / "tensors")
    directory = broken.model_dir("tiny")
    swap_ranges(directory / a.file, a.offset, directory / b.file, b.offset, a.stored_bytes)
    assert_refused(broken, kek, StoreIntegrityError, a.name, "swapped", secrets=secrets)
    # Two experts of one fused tensor: records of equal size, same tensor, other place.
    gate_up = tensors["model.layers.1.feed_forward.experts.gate_up_proj"]
    first, second = [r for r in gate_up.records() if r.row_start in (0, 1) and r.start % gate_up.row_bytes == 0]
    broken = copy_store(store, tmp_path / "experts")
    path = broken.model_dir("tiny") / gate_up.file
    swap_ranges(path, first.file_offset, path, second.file_offset, first.stored_length)
    assert_refused(broken, kek, StoreIntegrityError, gate_up.name, "record 0", secrets=secrets)


def test_a_file_of_another_model_is_refused(store, kek, tiny_moe, tmp_path: Path) -> None:
    """Same weights, same layout, imported twice: each import has its own model id and data key."""
    both = copy_store(store, tmp_path / "both")
    import_model(tiny_moe, both, "twin", kek, record_bytes=RECORD_BYTES, shard_bytes=SHARD_BYTES, progress=False)
    name = manifest_of(both.model_dir("tiny")).files[1].name
    assert (both.model_dir("twin") / name).stat().st_size == (both.model_dir("tiny") / name).stat().st_size
    shutil.copyfile(both.model_dir("twin") / name, both.model_dir("tiny") / name)
    assert_refused(both, kek, StoreIntegrityError, name, "does not authenticate", secrets=secrets_of(store, kek))


def test_a_truncated_file_is_refused_before_anything_is_decrypted(store, kek, tmp_path: Path) -> None:
    broken = copy_store(store, tmp_path / "store")
    file = manifest_of(broken.model_dir("tiny")).files[-1]
    path = broken.model_dir("tiny") / file.name
    path.write_bytes(path.read_bytes()[:-1])
    assert_refused(broken, kek, StoreIntegrityError, file.name, "truncated", secrets=secrets_of(store, kek))


def test_an_edited_or_resigned_manifest_is_refused(store, kek, tmp_path: Path) -> None:
    secrets = secrets_of(store, kek)
    edited = copy_store(store, tmp_path / "edited")
    path = edited.model_dir("tiny") / MANIFEST_FILE
    raw = json.loads(path.read_bytes())
    raw["tensors"][0]["shape"] = list(reversed(raw["tensors"][0]["shape"]))
    path.write_text(json.dumps(raw, indent=1) + "\n")
    assert_refused(edited, kek, StoreIntegrityError, MANIFEST_FILE, "does not match its signature", secrets=secrets)

    resigned = copy_store(store, tmp_path / "resigned")
    directory = resigned.model_dir("tiny")
    forger = Ed25519PrivateKey.generate()
    (directory / SIGNATURE_FILE).write_bytes(forger.sign((directory / MANIFEST_FILE).read_bytes()))
    assert_refused(resigned, kek, StoreIntegrityError, "does not match its signature", secrets=secrets)

    # A forger who also names their own key as the signer: the KEK-wrapped data key binds the real one.
    from cryptography.hazmat.primitives import serialization

    wrapped = WrappedDataKey.read(directory / DATA_KEY_FILE)
    forged_signer = forger.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (directory / DATA_KEY_FILE).write_bytes(
        WrappedDataKey(wrapped.model_id, forged_signer, wrapped.kek_id, wrapped.wrapped).to_bytes())
    assert_refused(resigned, kek, WrongKeyError, "datakey.json", secrets=secrets)


def test_the_wrong_kek_and_missing_providers_are_refused(store, kek, tmp_path: Path) -> None:
    secrets = secrets_of(store, kek)
    other = create_kek_file(tmp_path / "other-kek")
    assert_refused(store, other, WrongKeyError, "'tiny'", f"KEK id {kek.key_id()}", other.describe(), secrets=secrets)
    assert_refused(store, None, KeyUnavailableError, "no key-encryption key provider is configured", "--kek-file",
                   secrets=secrets)
    assert_refused(store, FileKeyProvider(tmp_path / "absent"), KeyUnavailableError, "absent", "does not exist",
                   secrets=secrets)
    assert_refused(store, EnvKeyProvider("GARRISON_TEST_NO_SUCH_KEK", environ={}), KeyUnavailableError,
                   "GARRISON_TEST_NO_SUCH_KEK is not set", secrets=secrets)
    assert_refused(store, SecretDirKeyProvider(tmp_path / "no-secret"), KeyUnavailableError, "no-secret",
                   secrets=secrets)
    malformed = tmp_path / "malformed"
    malformed.write_text("not a key\n")
    malformed.chmod(0o600)
    assert_refused(store, FileKeyProvider(malformed), KeyUnavailableError, "not a 256-bit key", secrets=secrets)


def test_every_provider_kind_opens_the_store(store, kek, tmp_path: Path) -> None:
    """The same KEK from a Kubernetes Secret mount (raw bytes, as `kubectl create secret --from-file` gives)
    and from an environment variable (hex) opens the model the file provider's KEK wrapped."""
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "kek").write_bytes(kek._kek())
    expected = store.open("tiny", kek).key
    assert store.open("tiny", SecretDirKeyProvider(secret_dir)).key == expected
    assert store.open("tiny", EnvKeyProvider("K", environ={"K": kek._kek().hex()})).key == expected


@pytest.mark.usefixtures("local_ray")
def test_a_broken_expert_of_rank_1_fails_the_ep2_group_to_start(store, kek, tmp_path: Path) -> None:
    """Rank 0 loads cleanly; rank 1 meets the flipped byte: the group is refused as a whole."""
    broken = copy_store(store, tmp_path / "store")
    down = next(t for t in manifest_of(broken.model_dir("tiny")).tensors
                if t.name == "model.layers.3.feed_forward.experts.down_proj")
    record = next(r for r in down.records() if r.row_start == 5)  # expert 5 lives on rank 1
    flip_byte(broken.model_dir("tiny") / down.file, record.file_offset + 40)
    with pytest.raises(StoreIntegrityError, match=down.name):
        LLMEngine.from_path(broken.open("tiny", kek), ENGINE, ParallelDims(ep=2))


# -- key rotation -----------------------------------------------------------------------------------


def digests(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in names}


def test_rotate_kek_rewraps_and_leaves_tensor_files_untouched(store, kek, tmp_path: Path, capsys) -> None:
    rotated = copy_store(store, tmp_path / "store")
    secrets = secrets_of(store, kek)
    directory = rotated.model_dir("tiny")
    untouched = [f.name for f in manifest_of(directory).files] + [MANIFEST_FILE, SIGNATURE_FILE]
    before = digests(directory, untouched)
    new = tmp_path / "new-kek"
    assert main(["keys", "create-kek", str(new)]) == 0
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    args = ["keys", "rotate-kek", "--store", str(rotated.root), "--kek-file", str(kek.path), "--new-kek-file", str(new)]
    assert main(args) == 0
    assert digests(directory, untouched) == before
    assert stat.S_IMODE((directory / DATA_KEY_FILE).stat().st_mode) == 0o600
    with pytest.raises(WrongKeyError, match="does not unwrap"):
        rotated.open("tiny", kek)
    stored = open_model_files(rotated.open("tiny", FileKeyProvider(new)))
    build_model(stored.config, stored.source)
    assert main(args) == 0  # run again: nothing left to rotate
    out = capsys.readouterr()
    assert "rewrapped 1 model(s)" in out.out and "all were already under it" in out.out
    new_secrets = [base64.b64encode(FileKeyProvider(new)._kek()).decode(), FileKeyProvider(new)._kek().hex()]
    assert not any(secret in out.out + out.err for secret in secrets + new_secrets)


# -- the CLI and key files --------------------------------------------------------------------------


def garrison(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "garrison", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_import_list_verify_and_generate(tiny_moe, prompt, reference_tokens, tmp_path: Path, capsys,
                                             monkeypatch) -> None:
    for variable in ("GARRISON_KEK_FILE", "GARRISON_KEK_SECRET_DIR", "GARRISON_KEK"):
        monkeypatch.delenv(variable, raising=False)
    kek_value = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("MY_KEK", kek_value)
    root = tmp_path / "store"
    printed = []

    code, out, err = run_cli(capsys, "models", "import", str(tiny_moe), "--name", "tiny", "--store", str(root),
                             "--kek-env", "MY_KEK")
    printed += [out, err]
    assert code == 0 and "imported tiny" in out and "importing tiny" in err  # the progress bar, on stderr
    for key_file in (root / "signing-key.pem", root / "tiny" / DATA_KEY_FILE):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    code, out, err = run_cli(capsys, "models", "list", "--store", str(root), "--json")
    printed += [out, err]
    [listed] = json.loads(out)["models"]
    assert code == 0 and listed["name"] == "tiny" and listed["architecture"] == "llama4"
    assert listed["kek_id"] == EnvKeyProvider("MY_KEK").key_id()

    code, out, err = run_cli(capsys, "models", "verify", "tiny", "--store", str(root), "--kek-env", "MY_KEK", "--json")
    printed += [out, err]
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["failures"] == [] and report["records"] > report["tensors"]

    code, out, err = run_cli(capsys, "models", "verify", "tiny", "--store", str(root), "--json")
    printed += [out, err]
    assert code == 1 and not json.loads(out)["ok"] and "no key-encryption key provider" in json.loads(out)["error"]

    result = garrison("generate", "--model", "tiny", "--store", str(root), "--kek-env", "MY_KEK", "--token-ids",
                      ",".join(map(str, prompt)), "--max-new-tokens", str(NEW_TOKENS), "--json")
    printed += [result.stdout, result.stderr]
    assert result.returncode == 0, result.stderr
    generated = json.loads(result.stdout)["token_ids"]  # the CLI stops at EOS; the reference ignored it
    assert generated and generated == reference_tokens[:len(generated)]

    manifest = manifest_of(root / "tiny")
    flip_byte(root / "tiny" / manifest.files[0].name, manifest.files[0].size - 1)
    code, out, err = run_cli(capsys, "models", "verify", "tiny", "--store", str(root), "--kek-env", "MY_KEK", "--json")
    printed += [out, err]
    report = json.loads(out)
    assert code == 1 and not report["ok"] and len(report["failures"]) == 1
    code, out, err = run_cli(capsys, "models", "verify", "tiny", "--store", str(root), "--kek-env", "MY_KEK")
    printed += [out, err]
    assert code == 1 and err.startswith("garrison: error: 1 of") and "does not authenticate" in err

    code, out, err = run_cli(capsys, "generate", "--model", "tiny", "--store", str(root), "--token-ids", "5,6")
    printed += [out, err]
    assert code == 1 and "no key-encryption key provider is configured" in err
    raw = base64.b64decode(kek_value)
    assert not any(secret in text for text in printed for secret in (kek_value, raw.hex()))


def test_key_files_are_owner_only(tmp_path: Path) -> None:
    provider = create_kek_file(tmp_path / "kek")
    assert stat.S_IMODE(provider.path.stat().st_mode) == 0o600
    with pytest.raises(KeyUnavailableError, match="already exists"):
        create_kek_file(tmp_path / "kek")
    provider.path.chmod(0o644)
    with pytest.raises(KeyUnavailableError, match=r"mode 0644.*chmod 600"):
        provider.key_id()


def test_data_key_repr_hides_the_secret(store, kek) -> None:
    model = store.open("tiny", kek)
    assert model.key.secret.hex() not in repr(model) + str(model)
    assert isinstance(model, StoreModel)


def test_store_names_cannot_escape_the_store(store, kek, tmp_path: Path) -> None:
    with pytest.raises(WeightStoreError, match="not a valid model name"):
        import_model(Path("."), store, "../escape", kek, progress=False)
    assert not store.has("../store")
