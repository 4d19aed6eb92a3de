"""`garrison models import|list|verify`: the encrypted weight store on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from garrison.cli.store_options import add_kek_options, add_store_option, provider_from_args, store_from_args
from garrison.model_refs import resolve_source
from garrison_workers.errors import GarrisonError, StoreIntegrityError


def register(commands: Any) -> None:
    group = commands.add_parser("models", help="import, list and verify models of the encrypted weight store",
                                description="Garrison's encrypted weight store: each tensor AES-256-GCM encrypted "
                                            "under a per-model data key, wrapped by a key-encryption key (KEK).")
    models = group.add_subparsers(dest="models_command", metavar="MODELS_COMMAND", required=True)

    imp = models.add_parser("import", help="encrypt an HF directory or GGUF file into the store",
                            description="Read a model (HF directory, .gguf file or bundled name) and write it "
                                        "encrypted into the store under NAME, with a signed manifest.")
    imp.add_argument("src", metavar="SRC", help="HF model directory, .gguf file, or bundled model name")
    imp.add_argument("--name", required=True, help="the model's name in the store (used as --model NAME)")
    add_store_option(imp)
    add_kek_options(imp)
    imp.add_argument("--signing-key", metavar="PATH", default=None,
                     help="Ed25519 manifest signing key, created if absent (default: signing-key.pem in the store)")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.add_argument("--quantize", choices=["int8", "int4"], default=None,
                     help="quantize the blocks' linear weights at import (round to nearest: int4 with a scale and "
                          "zero per group of up to 128 inputs, int8 with a scale per output channel); embeddings, "
                          "LM head, routers and norms stay as they are")
    imp.set_defaults(run=run_import)

    ls = models.add_parser("list", help="list the store's models (no key needed)")
    add_store_option(ls)
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(run=run_list)

    verify = models.add_parser("verify", help="check a stored model's key, signature and every tensor's tag",
                               description="Unwrap the data key, check the manifest signature and file sizes, and "
                                           "authenticate every record of every tensor (decrypted in memory only).")
    verify.add_argument("name", metavar="NAME")
    add_store_option(verify)
    add_kek_options(verify)
    verify.add_argument("--threads", type=int, default=0, help="decrypt threads (0: one per core, at most 4)")
    verify.add_argument("--json", action="store_true", help="print one JSON object (also on failure)")
    verify.set_defaults(run=run_verify)


def run_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from garrison.weight_store.importer import import_model

    store = store_from_args(args)
    summary = import_model(resolve_source(args.src), store, args.name, provider_from_args(args),
                           signing_key=Path(args.signing_key) if args.signing_key else None, progress=not args.quiet,
                           quantize=args.quantize)
    print(f"imported {summary.name} into {store.root}: {summary.architecture}, {summary.num_parameters:,} parameters "
          f"in {summary.num_tensors} tensors, {summary.stored_bytes / 1e9:.2f} GB encrypted; data key wrapped "
          f"under KEK id {summary.kek_id}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    store = store_from_args(args)
    summaries = [store.summary(name) for name in store.names()]
    if args.json:
        print(json.dumps({"store": str(store.root), "models": [s.to_json() for s in summaries]}))
        return 0
    if not summaries:
        print(f"the store {store.root} holds no models; import one with `garrison models import SRC --name NAME`")
        return 0
    rows = [("NAME", "ARCH", "PARAMS", "SIZE", "KEK ID", "MODEL ID", "CREATED")]
    rows += [(s.name, s.architecture, f"{s.num_parameters / 1e6:.1f}M", f"{s.stored_bytes / 1e9:.2f} GB", s.kek_id,
              s.model_id[:12], s.created) for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def run_verify(args: argparse.Namespace) -> int:
    store = store_from_args(args)
    try:
        result = store.verify(args.name, provider_from_args(args), args.threads)
    except GarrisonError as err:
        if not args.json:
            raise
        print(json.dumps({"name": args.name, "ok": False, "error": str(err), "failures": []}))
        return 1
    ok = not result.failures
    if args.json:
        print(json.dumps({"name": args.name, "ok": ok, "signature": "valid", "tensors": result.num_tensors,
                          "records": result.num_records, "bytes": result.num_bytes, "failures": result.failures}))
        return 0 if ok else 1
    if not ok:
        shown = "\n  ".join(result.failures[:10]) + (f"\n  and {len(result.failures) - 10} more"
                                                     if len(result.failures) > 10 else "")
        raise StoreIntegrityError(f"{len(result.failures)} of {result.num_records} records of {args.name!r} failed "
                                  f"authentication:\n  {shown}")
    print(f"{args.name}: OK — manifest signature valid, {result.num_tensors} tensors in {result.num_records} "
          f"records ({result.num_bytes / 1e9:.2f} GB) authenticated", file=sys.stdout)
    return 0
