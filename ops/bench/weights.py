"""Load throughput: Garrison's encrypted weight store against plain safetensors of the same model, on this CPU.

    .venv/bin/python ops/bench/weights.py [--quick] [--json] [--repeats R]

One run builds a random Llama 4 text model (fp32), saves it with transformers (one safetensors file),
imports it into an encrypted store (AES-256-GCM, 4 MiB records), and then loads it both ways with 1
and 2 threads: for each, the time to open the source and build the whole model with its weights in
place (`build_model`), in GB/s of parameter bytes. Threads means torch's intra-op threads for both,
and the store's decrypt threads for the encrypted load. Both sources are loaded once, untimed, before
any timed load, so both read from a warm page cache: the figures compare decrypting with plain
copying, not disks. Each figure is the best (and the median) of R loads, plaintext and encrypted
alternating. Also printed: the bytes one rank of an ep=2 group reads from the store.

Issue 6's target is encrypted >= 0.7x plaintext. A benchmark prints figures; it asserts nothing about
time (DESIGN.md, rule 9). Progress goes to stderr, so `--json` leaves stdout pure JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from _common import (  # this folder is on sys.path: the benchmarks run as scripts
    Machine, finite_or_none, fmt_load, machine_busy_s, machine_facts, own_cpu_s, progress, save_random_llama4)

from garrison.weight_store.importer import import_model
from garrison.weight_store.keys import create_kek_file
from garrison.weight_store.store import Store
from garrison_workers.config import ModelConfig
from garrison_workers.loader import build_model, open_model_files
from garrison_workers.parallel.context import ParallelContext
from garrison_workers.parallel.dims import ParallelDims
from garrison_workers.weights.encrypted_source import EncryptedSource
from garrison_workers.weights.safetensors_source import SafetensorsSource
from garrison_workers.weights.store_format import DEFAULT_RECORD_BYTES, Manifest, StoreModel, is_expert_tensor

MB = 1e6
TARGET_RATIO = 0.7
THREADS = (1, 2)


@dataclass(slots=True, frozen=True)
class Workload:
    hidden_size: int
    num_experts: int
    expert_intermediate_size: int
    vocab_size: int
    num_layers: int
    repeats: int
    seed: int = 0

    def overrides(self) -> dict[str, Any]:
        return dict(hidden_size=self.hidden_size, intermediate_size=self.expert_intermediate_size,
                    intermediate_size_mlp=2 * self.expert_intermediate_size, num_local_experts=self.num_experts,
                    num_hidden_layers=self.num_layers, vocab_size=self.vocab_size, num_attention_heads=16,
                    num_key_value_heads=4, head_dim=self.hidden_size // 16, interleave_moe_layer_step=1)


FULL = Workload(hidden_size=1024, num_experts=16, expert_intermediate_size=1024, vocab_size=32000, num_layers=4,
                repeats=5)
QUICK = Workload(hidden_size=512, num_experts=8, expert_intermediate_size=512, vocab_size=16000, num_layers=4,
                 repeats=3)


@dataclass(slots=True)
class Row:
    threads: int
    plain_s: list[float]
    encrypted_s: list[float]
    others_cores: float  # cores other processes kept busy, on average, during this row's loads

    def figures(self, weight_bytes: int) -> dict[str, float]:
        plain, enc = min(self.plain_s), min(self.encrypted_s)
        return {"plain_gb_s_best": weight_bytes / plain / 1e9,
                "plain_gb_s_median": weight_bytes / statistics.median(self.plain_s) / 1e9,
                "encrypted_gb_s_best": weight_bytes / enc / 1e9,
                "encrypted_gb_s_median": weight_bytes / statistics.median(self.encrypted_s) / 1e9,
                "ratio_best": plain / enc, "ratio_median": statistics.median(self.plain_s) / statistics.median(self.encrypted_s)}


@dataclass(slots=True)
class Report:
    machine: Machine
    workload: Workload
    quick: bool
    parameters: int
    weight_bytes: int
    store_bytes: int
    num_records: int
    num_files: int
    build_s: float
    import_s: float
    ep2_rank0_bytes: int
    ep2_bound_bytes: float
    rows: list[Row]
    wall_s: float


# -- measuring --------------------------------------------------------------------------------------


def timed_load(open_source: Callable[[], Any], config: ModelConfig) -> float:
    gc.collect()
    start = time.perf_counter()
    model = build_model(config, open_source())
    elapsed = time.perf_counter() - start
    del model
    return elapsed


def measure_row(threads: int, plain_dir: Path, stored: StoreModel, config: ModelConfig, repeats: int) -> Row:
    torch.set_num_threads(threads)
    stored = dataclasses.replace(stored, decrypt_threads=threads)
    plain = lambda: SafetensorsSource(plain_dir, dense_llama=False)  # noqa: E731
    encrypted = lambda: EncryptedSource(stored)  # noqa: E731
    row = Row(threads, [], [], 0.0)
    busy, own, start = machine_busy_s(), own_cpu_s(), time.perf_counter()
    for repeat in range(repeats):
        row.plain_s.append(timed_load(plain, config))
        row.encrypted_s.append(timed_load(encrypted, config))
        progress(f"threads {threads}, load {repeat + 1}/{repeats}: plaintext {row.plain_s[-1]:.3f} s, "
                 f"encrypted {row.encrypted_s[-1]:.3f} s")
    elapsed = time.perf_counter() - start
    row.others_cores = max(0.0, ((machine_busy_s() - busy) - (own_cpu_s() - own)) / elapsed)
    return row


def ep2_rank0_read(stored: StoreModel, config: ModelConfig, manifest: Manifest) -> tuple[int, float]:
    """Bytes rank 0 of an ep=2 group reads from the store, and issue 6's bound (non-expert + half the experts)."""
    source = EncryptedSource(stored)
    build_model(config, source, par=ParallelContext(ParallelDims(ep=2), 0))
    experts = sum(t.stored_bytes for t in manifest.tensors if is_expert_tensor(t.name))
    others = sum(t.stored_bytes for t in manifest.tensors if not is_expert_tensor(t.name))
    return source.bytes_read, others + experts / 2


def run_benchmark(quick: bool, repeats: int | None) -> Report:
    workload = QUICK if quick else FULL
    if repeats:
        workload = dataclasses.replace(workload, repeats=repeats)
    machine, wall = machine_facts(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="garrison-bench-weights-") as tmp:
        root = Path(tmp)
        progress("building and saving the random model...")
        start = time.perf_counter()
        save_random_llama4(root / "plain", workload.seed, **workload.overrides())
        build_s = time.perf_counter() - start
        progress("importing it into the encrypted store...")
        kek, store = create_kek_file(root / "kek"), Store(root / "store")
        start = time.perf_counter()
        import_model(root / "plain", store, "bench", kek, progress=False)
        import_s = time.perf_counter() - start
        stored = store.open("bench", kek)
        files = open_model_files(stored)
        manifest = EncryptedSource(stored).manifest
        config = files.config
        progress("untimed warm-up load of each source (page cache)...")
        timed_load(lambda: SafetensorsSource(root / "plain", dense_llama=False), config)
        timed_load(lambda: EncryptedSource(stored), config)
        rows = [measure_row(threads, root / "plain", stored, config, workload.repeats) for threads in THREADS]
        rank0, bound = ep2_rank0_read(stored, config, manifest)
        parameters = sum(math.prod(t.shape) for t in manifest.tensors)
        weight_bytes = sum(t.nbytes for t in manifest.tensors)
    machine.load_average_end = os.getloadavg()
    return Report(machine, workload, quick, parameters, weight_bytes, sum(f.size for f in manifest.files),
                  sum(len(t.records()) for t in manifest.tensors), len(manifest.files), build_s, import_s,
                  rank0, bound, rows, time.perf_counter() - wall)


# -- output -----------------------------------------------------------------------------------------


def render(report: Report) -> str:
    m, w = report.machine, report.workload
    lines = [
        f"machine    {m.cpu}; {m.os_cpu_count} cores, {m.ram_gib:.0f} GiB RAM; torch {m.torch_version}, python"
        f" {m.python_version}",
        f"date       {m.date}; load average start {fmt_load(m.load_average_start)}, end {fmt_load(m.load_average_end)}",
        f"mode       {'quick' if report.quick else 'full'}; run wall time {report.wall_s:.0f} s (model built and saved"
        f" in {report.build_s:.1f} s, imported in {report.import_s:.1f} s)",
        f"model      random Llama 4: hidden {w.hidden_size}, {w.num_experts} experts of intermediate"
        f" {w.expert_intermediate_size} + a shared expert, {w.num_layers} MoE layers, vocab {w.vocab_size};"
        f" {report.parameters / 1e6:.1f} M parameters,",
        f"           {report.weight_bytes / MB:.0f} MB fp32; plaintext: one model.safetensors; store:"
        f" {report.store_bytes / MB:.0f} MB in {report.num_files} file(s), {report.num_records} records of up to"
        f" {DEFAULT_RECORD_BYTES >> 20} MiB",
        f"workload   open the source and build_model (all weights in place, ep = 1), warm page cache; best and"
        f" median of {w.repeats} loads each,",
        "           plaintext and encrypted alternating; threads = torch intra-op threads (both) and decrypt"
        " threads (encrypted)",
        "",
        f"{'threads':>7}{'plain GB/s':>12}{'median':>8}{'encrypted GB/s':>16}{'median':>8}{'enc/plain':>11}"
        f"{'median':>8}{'others':>8}",
    ]
    for row in report.rows:
        f = row.figures(report.weight_bytes)
        lines.append(f"{row.threads:>7}{f['plain_gb_s_best']:>12.2f}{f['plain_gb_s_median']:>8.2f}"
                     f"{f['encrypted_gb_s_best']:>16.2f}{f['encrypted_gb_s_median']:>8.2f}{f['ratio_best']:>10.2f}x"
                     f"{f['ratio_median']:>7.2f}x{row.others_cores:>8.2f}")
    worst = min(row.figures(report.weight_bytes)["ratio_best"] for row in report.rows)
    lines += [
        "",
        f"target     encrypted >= {TARGET_RATIO}x plaintext (issue 6): {'met' if worst >= TARGET_RATIO else 'NOT met'}"
        f" at every thread count (lowest best-of ratio {worst:.2f}x)",
        f"ep=2       rank 0 reads {report.ep2_rank0_bytes / MB:.1f} MB of {report.store_bytes / MB:.1f} MB stored"
        f" (bound: non-expert + half the experts = {report.ep2_bound_bytes / MB:.1f} MB)",
        "columns    GB/s: parameter bytes / (open + build_model) seconds; enc/plain: plaintext time / encrypted time"
        " (above 1: encrypted faster);",
        "           others: cores other processes kept busy meanwhile (well above 0: disturbed, rerun)",
    ]
    return "\n".join(lines)


def to_json(report: Report) -> str:
    body = {"machine": asdict(report.machine), "workload": asdict(report.workload), "quick": report.quick,
            "parameters": report.parameters, "weight_bytes": report.weight_bytes, "store_bytes": report.store_bytes,
            "records": report.num_records, "files": report.num_files, "build_s": report.build_s,
            "import_s": report.import_s, "ep2_rank0_bytes": report.ep2_rank0_bytes,
            "ep2_bound_bytes": report.ep2_bound_bytes, "wall_s": report.wall_s,
            "rows": [dict(threads=r.threads, plain_s=r.plain_s, encrypted_s=r.encrypted_s, others_cores=r.others_cores,
                          **r.figures(report.weight_bytes)) for r in report.rows]}
    return json.dumps(finite_or_none(body), indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 190 MB model, 3 loads each: a smoke test")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--repeats", type=int, default=None, help="loads per source and thread count (best of R)")
    args = parser.parse_args()
    report = run_benchmark(args.quick, args.repeats)
    print(to_json(report) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
