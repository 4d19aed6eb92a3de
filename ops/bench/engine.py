"""Garrison's engine against transformers `generate`, side by side, on SmolLM2-135M in fp32 on this CPU.

    .venv/bin/python ops/bench/engine.py [--quick] [--json] [--repeats R]

For each concurrency N the same N prompts (mixed lengths, fixed seed) run through three systems:
Garrison's engine (continuous batching), transformers with all N prompts in one left-padded batch,
and transformers one request at a time (what a naive server on transformers does with N concurrent
requests). Each system runs every workload with one new token (the prefill) and with the full count;
decode time is the difference, so both systems are measured the same way. Every request generates
exactly the same number of tokens (greedy, EOS ignored). Each time is the best of R runs, and each row
says how many cores other processes kept busy meanwhile: the machine may be shared.

Also printed: peak RSS, and the batch-1 decode bound that memory bandwidth sets (every decode step
reads every weight once). A benchmark prints figures; it asserts nothing about time (DESIGN.md,
rule 9). Progress goes to stderr, so `--json` leaves stdout pure JSON.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

# transformers' GGUF loader draws a progress bar with plain tqdm, which reads this when first imported.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from garrison.model_refs import resolve_model  # noqa: E402
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from garrison_workers.engine.sequence import SamplingParams  # noqa: E402

from _common import (  # noqa: E402  (this folder is on sys.path: the benchmarks run as scripts)
    GiB, Machine, engine_config_dict, finite_or_none, fmt, fmt_load, machine_busy_s, machine_facts, own_cpu_s,
    proc_kib, progress)

MODEL = "smollm2"
FIRST_PLAIN_TOKEN_ID = 100  # SmolLM2's special tokens sit at the bottom of the vocabulary


# -- workload and results ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Workload:
    concurrencies: tuple[int, ...]
    min_prompt_tokens: int
    max_prompt_tokens: int
    new_tokens: int
    seed: int = 0

    def prompts(self, vocab_size: int) -> list[list[int]]:
        """One pool of random-token prompts; concurrency N takes the first N."""
        rng = random.Random(self.seed)
        return [[rng.randrange(FIRST_PLAIN_TOKEN_ID, vocab_size)
                 for _ in range(rng.randint(self.min_prompt_tokens, self.max_prompt_tokens))]
                for _ in range(max(self.concurrencies))]


FULL = Workload(concurrencies=(1, 8, 32), min_prompt_tokens=64, max_prompt_tokens=192, new_tokens=64)
QUICK = Workload(concurrencies=(1, 8), min_prompt_tokens=32, max_prompt_tokens=96, new_tokens=16)


@dataclass(slots=True, frozen=True)
class Timing:
    seconds: float
    others_cores: float  # cores other processes (or the hypervisor) kept busy, on average, meanwhile


@dataclass(slots=True)
class Result:
    system: str
    concurrency: int
    prompt_tokens: int
    output_tokens: int
    prefill_s: float  # best wall time of the runs with one new token per request
    full_s: float  # best wall time of the runs with every new token
    others_cores: float  # the larger of the two kept runs' figures

    @property
    def decode_s(self) -> float:
        return self.full_s - self.prefill_s

    def figures(self) -> dict[str, float]:
        decode_tokens = self.output_tokens - self.concurrency  # each first token came out of the prefill
        return {
            "prefill_tok_s": self.prompt_tokens / self.prefill_s,
            "decode_tok_s": decode_tokens / self.decode_s if self.decode_s > 0 else math.nan,
            "output_tok_s": self.output_tokens / self.full_s,
            "overall_tok_s": (self.prompt_tokens + self.output_tokens) / self.full_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decode_s": self.decode_s, **self.figures()}


@dataclass(slots=True)
class Memory:
    garrison_peak_rss_gib: float = 0.0  # peak of the garrison phase (load, warm-up, every run)
    transformers_peak_rss_gib: float = 0.0  # peak of the transformers phase, the engine already freed
    process_peak_rss_gib: float = 0.0  # the whole run, the bandwidth test's buffers included
    weight_bytes: int = 0  # every parameter once (the tied lm_head / embedding counted once)
    copy_gb_s: float = 0.0  # bytes read + bytes written per second, best of 3
    copy_read_gb_s: float = 0.0  # the read half of the copy
    sum_read_gb_s: float = 0.0  # a pure read stream (torch.sum), best of 3

    def decode_bound_tok_s(self) -> float:
        """Batch-1 decode steps per second if a step cost only reading the weights at copy bandwidth."""
        return self.copy_gb_s * 1e9 / self.weight_bytes


@dataclass(slots=True)
class Report:
    machine: Machine
    workload: Workload
    quick: bool
    repeats: int
    engine_config: dict[str, Any]
    load_s: dict[str, float] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    memory: Memory = field(default_factory=Memory)
    wall_s: float = 0.0

    def result(self, system: str, concurrency: int) -> Result:
        return next(r for r in self.results if r.system == system and r.concurrency == concurrency)


# -- the systems under test -------------------------------------------------------------------------


class System(Protocol):
    name: str

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        """Generate `new_tokens` for every prompt; return how many tokens came out."""
        ...


class GarrisonSystem:
    name = "garrison"

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._runs = itertools.count()

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        # A fresh prefix-cache salt per run: repeated prompts are recomputed, never served from cache.
        run = next(self._runs)
        salt = f"bench-{run}".encode()
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        for index, prompt in enumerate(prompts):
            self.engine.add_request(f"bench-{run}-{index}", prompt, params, salt=salt)
        generated = 0
        while self.engine.has_unfinished_requests():
            generated += sum(len(out.new_token_ids) for out in self.engine.step())
        return generated


class TransformersBatched:
    name = "hf-batched"

    def __init__(self, model: Any, pad_token_id: int) -> None:
        self.model, self.pad_token_id = model, pad_token_id

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        return hf_generate(self.model, prompts, new_tokens, self.pad_token_id)


class TransformersSequential(TransformersBatched):
    name = "hf-sequential"

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        return sum(hf_generate(self.model, [prompt], new_tokens, self.pad_token_id) for prompt in prompts)


def hf_generate(model: Any, prompts: list[list[int]], new_tokens: int, pad_token_id: int) -> int:
    """Greedy `generate` of exactly `new_tokens` per prompt, the batch left-padded with a mask."""
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id)
    return (out.shape[1] - width) * len(prompts)


# -- measuring --------------------------------------------------------------------------------------


def timed_run(system: System, prompts: list[list[int]], new_tokens: int) -> Timing:
    busy, own, start = machine_busy_s(), own_cpu_s(), time.perf_counter()
    checked_run(system, prompts, new_tokens)
    seconds = time.perf_counter() - start
    others = (machine_busy_s() - busy) - (own_cpu_s() - own)
    return Timing(seconds, max(0.0, others / seconds))


def checked_run(system: System, prompts: list[list[int]], new_tokens: int) -> int:
    """Run, and refuse figures for a run that generated the wrong number of tokens."""
    generated = system.run(prompts, new_tokens)
    if generated != len(prompts) * new_tokens:
        raise RuntimeError(f"{system.name} generated {generated} tokens, expected {len(prompts) * new_tokens}")
    return generated


def best_of(repeats: int, system: System, prompts: list[list[int]], new_tokens: int) -> Timing:
    return min((timed_run(system, prompts, new_tokens) for _ in range(repeats)), key=lambda t: t.seconds)


def measure(system: System, prompts: list[list[int]], new_tokens: int, repeats: int) -> Result:
    prefill = best_of(repeats, system, prompts, 1)
    full = best_of(repeats, system, prompts, new_tokens)
    result = Result(system.name, len(prompts), sum(map(len, prompts)), len(prompts) * new_tokens,
                    prefill.seconds, full.seconds, max(prefill.others_cores, full.others_cores))
    progress(f"  {system.name:<14} N={len(prompts):<3} prefill {prefill.seconds:7.2f} s   full {full.seconds:7.2f} s"
             f"   others {result.others_cores:.2f} cores")
    return result


def measure_all(systems: list[System], pool: list[list[int]], workload: Workload, repeats: int) -> list[Result]:
    for system in systems:  # one warm-up per system: first-call allocations and kernel choices
        checked_run(system, pool[:2], 4)
    return [measure(system, pool[:n], workload.new_tokens, repeats)
            for n in workload.concurrencies for system in systems]


def start_phase_peak() -> None:
    """Open a new peak-RSS window: on Linux, writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # refused: the phase peak then includes earlier phases
        pass


def phase_peak_rss_gib() -> float:
    return proc_kib("/proc/self/status", "VmHWM") * 1024 / GiB


def process_peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # ru_maxrss is KiB on Linux


def memory_bandwidths(num_bytes: int = 512 << 20, repeats: int = 3) -> tuple[float, float]:
    """(copy GB/s counting bytes read + written, pure-read GB/s), best of `repeats` each."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault every page in before timing
    copy_s = min(seconds(lambda: dst.copy_(src)) for _ in range(repeats))
    read_s = min(seconds(lambda: src.sum()) for _ in range(repeats))
    return 2 * num_bytes / copy_s / 1e9, num_bytes / read_s / 1e9


def seconds(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() skips tied repeats


# -- the run ----------------------------------------------------------------------------------------


def garrison_phase(report: Report, path: Path, config: EngineConfig) -> list[list[int]]:
    progress("garrison: loading")
    start_phase_peak()
    start = time.perf_counter()
    engine = LLMEngine.from_path(path, config)
    report.load_s["garrison"] = time.perf_counter() - start
    assert engine.tokenizer is not None  # a GGUF always carries its tokenizer
    pool = report.workload.prompts(engine.tokenizer.vocab_size)
    report.results += measure_all([GarrisonSystem(engine)], pool, report.workload, report.repeats)
    report.memory.garrison_peak_rss_gib = phase_peak_rss_gib()
    return pool


def transformers_phase(report: Report, path: Path, pool: list[list[int]]) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate() warns about sampling flags greedy search ignores
    progress("transformers: loading")
    start_phase_peak()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    report.load_s["transformers"] = time.perf_counter() - start
    report.memory.weight_bytes = weight_bytes(model)  # the same checkpoint the engine loaded
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.config.eos_token_id
    systems: list[System] = [TransformersBatched(model, pad), TransformersSequential(model, pad)]
    report.results += measure_all(systems, pool, report.workload, report.repeats)
    report.memory.transformers_peak_rss_gib = phase_peak_rss_gib()


def run_benchmark(quick: bool, repeats: int) -> Report:
    started = time.perf_counter()
    config = EngineConfig()  # what `garrison serve` runs: fp32 on CPU, default cache and batch limits
    report = Report(machine_facts(), QUICK if quick else FULL, quick, repeats, engine_config_dict(config))
    path = resolve_model(MODEL)
    pool = garrison_phase(report, path, config)
    gc.collect()  # the engine is gone: its weights and KV cache are not counted in the next phase
    transformers_phase(report, path, pool)
    progress("memory bandwidth")
    memory = report.memory
    memory.copy_gb_s, memory.sum_read_gb_s = memory_bandwidths()
    memory.copy_read_gb_s = memory.copy_gb_s / 2
    # Resetting VmHWM resets the high-water mark ru_maxrss reads too, so the first phase counts apart.
    memory.process_peak_rss_gib = max(process_peak_rss_gib(), memory.garrison_peak_rss_gib)
    report.machine.load_average_end = os.getloadavg()
    report.wall_s = time.perf_counter() - started
    return report


# -- output -----------------------------------------------------------------------------------------


SYSTEM_LABELS = {"garrison": "garrison", "hf-batched": "transformers batched",
                 "hf-sequential": "transformers sequential"}
BASELINES = ("hf-batched", "hf-sequential")
RATIO_FIGURES = ("prefill_tok_s", "decode_tok_s", "overall_tok_s")


def render(report: Report) -> str:
    return "\n".join([*header_lines(report), "", *results_lines(report), "", *ratio_lines(report), "",
                      *memory_lines(report)])


def header_lines(report: Report) -> list[str]:
    m, w, c = report.machine, report.workload, report.engine_config
    mode = "QUICK (smoke test: fewer, shorter requests)" if report.quick else "full"
    return [
        "Garrison engine vs transformers generate: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), fp32, CPU",
        f"machine    {m.cpu}; os.cpu_count {m.os_cpu_count}; torch threads {m.torch_threads}; RAM {m.ram_gib:.1f} GiB",
        f"software   torch {m.torch_version}; transformers {m.transformers_version}; python {m.python_version}",
        f"date       {m.date}; load average start {fmt_load(m.load_average_start)}, end {fmt_load(m.load_average_end)}",
        f"mode       {mode}; run wall time {report.wall_s:.0f} s; model load garrison {report.load_s['garrison']:.1f} s,"
        f" transformers {report.load_s['transformers']:.1f} s",
        f"workload   N = {', '.join(map(str, w.concurrencies))} concurrent requests; prompts {w.min_prompt_tokens}-"
        f"{w.max_prompt_tokens} random token ids (seed {w.seed}); {w.new_tokens} new tokens each, greedy, EOS ignored"
        " (both systems)",
        f"garrison   block {c['block_size']}, KV cache {c['kv_cache_bytes'] / GiB:.1f} GiB, max_num_seqs "
        f"{c['max_num_seqs']}, max_num_batched_tokens {c['max_num_batched_tokens']}, prefix cache on (fresh salt per run)",
        "method     prefill = run with 1 new token; decode = (full run - prefill run), tokens after the first;",
        "           output = generated tokens / full run; overall = (prompt + generated) / full run;",
        f"           one warm-up per system; every time is the best of {report.repeats} runs; others = cores other",
        "           processes kept busy during the kept runs (well above 0: the row was disturbed)",
    ]


def results_lines(report: Report) -> list[str]:
    lines = [f"{'N':>3}  {'system':<24}{'prompt tok':>11}{'prefill s':>10}{'decode s':>10}"
             f"{'prefill tok/s':>15}{'decode tok/s':>14}{'output tok/s':>14}{'overall tok/s':>15}{'others':>8}"]
    order = list(SYSTEM_LABELS)
    for r in sorted(report.results, key=lambda r: (r.concurrency, order.index(r.system))):
        if r.system == order[0] and len(lines) > 1:
            lines.append("")
        f = r.figures()
        lines.append(f"{r.concurrency:>3}  {SYSTEM_LABELS[r.system]:<24}{r.prompt_tokens:>11}{r.prefill_s:>10.2f}"
                     f"{r.decode_s:>10.2f}{fmt(f['prefill_tok_s'], 15)}{fmt(f['decode_tok_s'], 14)}"
                     f"{fmt(f['output_tok_s'], 14)}{fmt(f['overall_tok_s'], 15)}{r.others_cores:>8.2f}")
    return lines


def ratios(report: Report, concurrency: int, baseline: str) -> list[float]:
    ours = report.result("garrison", concurrency).figures()
    theirs = report.result(baseline, concurrency).figures()
    return [ours[name] / theirs[name] for name in RATIO_FIGURES]


def ratio_lines(report: Report) -> list[str]:
    lines = ["garrison / transformers (above 1: garrison faster)",
             f"{'N':>3}  {'against':<24}{'prefill':>10}{'decode':>10}{'overall':>10}"]
    for n in report.workload.concurrencies:
        for baseline in BASELINES:
            lines.append(f"{n:>3}  {SYSTEM_LABELS[baseline]:<24}"
                         + "".join(fmt(x, 10, 2, "x") for x in ratios(report, n, baseline)))
    return lines


def memory_lines(report: Report) -> list[str]:
    mem = report.memory
    bound = mem.decode_bound_tok_s()
    measured = report.result("garrison", 1).figures()["decode_tok_s"]
    kv_gib = report.engine_config["kv_cache_bytes"] / GiB
    return [
        f"peak RSS   garrison phase {mem.garrison_peak_rss_gib:.2f} GiB (weights and a {kv_gib:.1f} GiB KV cache);"
        f" transformers phase {mem.transformers_peak_rss_gib:.2f} GiB (engine freed first);",
        f"           whole process {mem.process_peak_rss_gib:.2f} GiB (ru_maxrss; the bandwidth test's 1 GiB included)",
        f"bandwidth  copy of 512 MiB, best of 3: {mem.copy_gb_s:.1f} GB/s read + written ({mem.copy_read_gb_s:.1f}"
        f" GB/s read); pure read (torch.sum): {mem.sum_read_gb_s:.1f} GB/s",
        f"bound      weights {mem.weight_bytes / 1e6:.0f} MB read per decode step / {mem.copy_gb_s:.1f} GB/s ="
        f" {bound:.1f} steps/s = {bound:.1f} tok/s at batch 1",
        f"           garrison batch-1 decode {measured:.1f} tok/s = {100 * measured / bound:.0f}% of the bound"
        f" ({bound / measured:.1f}x below it)",
    ]


def to_json(report: Report) -> str:
    body = {
        "machine": asdict(report.machine), "workload": asdict(report.workload), "quick": report.quick,
        "repeats": report.repeats, "engine_config": report.engine_config, "load_s": report.load_s,
        "wall_s": report.wall_s, "results": [r.to_dict() for r in report.results],
        "ratios": {f"{n}/{baseline}": dict(zip(RATIO_FIGURES, ratios(report, n, baseline)))
                   for n in report.workload.concurrencies for baseline in BASELINES},
        "memory": {**asdict(report.memory), "decode_bound_tok_s": report.memory.decode_bound_tok_s()},
    }
    return json.dumps(finite_or_none(body), indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests: a smoke test of the script")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the best is kept (default 2)")
    args = parser.parse_args()
    report = run_benchmark(args.quick, max(1, args.repeats))
    print(to_json(report) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
