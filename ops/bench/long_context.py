"""Long-context prefill and decode of a tiny random Llama 4 on this CPU: peak RSS against the KV cache size.

    .venv/bin/python ops/bench/long_context.py [--quick] [--json] [--lengths 32768 65536 ...]

One run builds a tiny random Llama 4 text model with Llama 4's attention layout: three RoPE layers that
attend only within their 8192-token chunk, then one global NoPE layer (no_rope_layer_interval 4) with
attention temperature tuning above 8192 positions. It saves the model with transformers and prefills,
then greedily decodes, one prompt of random token ids (fixed seed) per length: 32k, 64k, 128k and 256k
(262,144) tokens, each in a fresh process, so each peak RSS belongs to one length. The KV cache is
preallocated once for the longest prompt and is the same size in every row: with bounded-memory
attention the peak RSS stays flat as the prompt grows, at the KV cache size plus a fixed margin.

For each length: prefill wall time and tokens/s, decode time per token, the RSS of the process once
it has loaded the model and allocated the cache (baseline), the peak RSS of prefill and of decode
(VmHWM, reset between phases), and peak - KV cache (the margin) and peak - baseline (what the
request itself added). Correctness: at 8192 tokens, transformers' greedy `generate` on the same
model and prompt must give Garrison's first tokens (and their log-probabilities). The first tokens
at every length are printed as well.

A benchmark prints figures; it asserts nothing about time (DESIGN.md, rule 9). Progress goes to
stderr, so `--json` leaves stdout pure JSON. Internally the script re-runs itself with `--one LENGTH`
(one Garrison row) and `--reference LENGTH` (transformers), each printing one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (  # this folder is on sys.path: the benchmarks run as scripts
    Machine,
    engine_config_dict,
    finite_or_none,
    fmt_load,
    machine_busy_s,
    machine_facts,
    own_cpu_s,
    proc_kib,
    progress,
    save_random_llama4,
)
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
from garrison_workers.engine.sequence import SamplingParams

MiB = 1 << 20
FIRST_TOKEN_ID = 3  # 0, 1, 2 are pad, BOS and EOS in tiny_llama4
DTYPE_BYTES = 4  # fp32
MODEL_SEED = 0

# hidden 64, 4 heads over 2 KV heads of 16 dims, 4 layers: layers 0-2 chunked-local RoPE, layer 3 global
# NoPE. Real Llama 4 attention settings (chunk 8192, floor 8192) instead of the test defaults; a context
# above 262,144 + new tokens.
MODEL_OVERRIDES: dict[str, Any] = {
    "num_hidden_layers": 4, "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "floor_scale": 8192,
    "max_position_embeddings": 300_000}


@dataclass(slots=True, frozen=True)
class Workload:
    lengths: tuple[int, ...]
    reference_length: int  # where transformers is run for the first-token check (0: skipped)
    new_tokens: int = 8
    seed: int = 0
    block_size: int = 16
    max_num_batched_tokens: int = 2048  # the prefill chunk
    attention_key_block: int = 4096
    threads: int = 0  # torch threads in every process; 0: torch's own choice (one per core)

    @property
    def cache_tokens(self) -> int:
        """Tokens the preallocated KV cache holds: the longest prompt in the run plus its new tokens."""
        return max((*self.lengths, self.reference_length)) + self.new_tokens

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.cache_tokens // self.block_size)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            attention_key_block=self.attention_key_block, enable_prefix_caching=False)


FULL = Workload(lengths=(32_768, 65_536, 131_072, 262_144), reference_length=8192)
QUICK = Workload(lengths=(8192, 16_384), reference_length=8192)


def make_prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    """Random token ids; a shorter prompt of the same seed is a prefix of a longer one."""
    rng = random.Random(seed)
    return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(length)]


def save_model(directory: Path) -> dict[str, Any]:
    return save_random_llama4(directory, MODEL_SEED, **MODEL_OVERRIDES)


# -- memory -----------------------------------------------------------------------------------------


def rss_bytes() -> int:
    return proc_kib("/proc/self/status", "VmRSS") * 1024


def hwm_bytes() -> int:
    return proc_kib("/proc/self/status", "VmHWM") * 1024


def reset_hwm() -> bool:
    """Open a new peak-RSS window: on Linux, writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # refused: each phase's peak then includes the phases before it
        return False


# -- one Garrison row (child process) ---------------------------------------------------------------


@dataclass(slots=True)
class Row:
    prompt_tokens: int
    new_tokens: int
    tokens: list[int]
    logprobs: list[float | None]
    load_s: float
    prefill_s: float  # from add_request until the first token came out
    prefill_steps: int
    last_prefill_step_s: float  # the step with the longest context: the global layer's worst case
    decode_s: float  # the remaining new_tokens - 1 tokens
    others_cores: float  # cores other processes kept busy during prefill + decode
    kv_cache_bytes: int  # num_blocks * block_size * kv_bytes_per_token(4)
    num_kv_blocks: int
    baseline_rss: int  # after loading the model and allocating the cache, before the request
    load_peak_rss: int  # VmHWM after loading
    prefill_peak_rss: int  # VmHWM during prefill (reset after loading)
    decode_peak_rss: int  # VmHWM during decode (reset after prefill)
    end_rss: int
    peak_reset_ok: bool

    @property
    def peak_rss(self) -> int:
        return max(self.load_peak_rss, self.prefill_peak_rss, self.decode_peak_rss)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_ms_per_token(self) -> float:
        return 1000 * self.decode_s / (self.new_tokens - 1) if self.new_tokens > 1 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_rss": self.peak_rss, "prefill_tok_s": self.prefill_tok_s,
                "decode_ms_per_token": self.decode_ms_per_token,
                "peak_minus_kv": self.peak_rss - self.kv_cache_bytes,
                "peak_minus_baseline": self.peak_rss - self.baseline_rss}


def run_one(model_dir: Path, length: int, workload: Workload) -> Row:
    """Load, allocate the cache, prefill one `length`-token prompt and decode; every figure of one row."""
    start = time.perf_counter()
    engine = LLMEngine.from_path(model_dir, workload.engine_config())
    load_s = time.perf_counter() - start
    gc.collect()
    baseline, load_peak = rss_bytes(), hwm_bytes()
    reset_ok = reset_hwm()
    prompt = make_prompt(length, engine.model_config.vocab_size, workload.seed)  # counted in the prefill peak

    params = SamplingParams(max_tokens=workload.new_tokens, ignore_eos=True, logprobs=True)
    tokens: list[int] = []
    logprobs: list[float | None] = []
    busy, own = machine_busy_s(), own_cpu_s()
    start = time.perf_counter()
    engine.add_request(f"long-{length}", prompt, params)
    del prompt  # the engine holds its own copy
    steps, last_step_s = 0, 0.0
    while not tokens:  # prefill: chunked steps until the last prompt token's logits give a token
        step_start = time.perf_counter()
        for out in engine.step():
            tokens += out.new_token_ids
            logprobs += out.new_logprobs
        last_step_s, steps = time.perf_counter() - step_start, steps + 1
    prefill_s = time.perf_counter() - start
    prefill_peak = hwm_bytes()
    progress(f"  {length:>7} tokens: prefill {prefill_s:7.1f} s in {steps} steps (last {last_step_s:.2f} s),"
             f" peak RSS {prefill_peak / MiB:.0f} MiB")
    reset_hwm()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
            logprobs += out.new_logprobs
    decode_s = time.perf_counter() - start
    wall = prefill_s + decode_s
    others = max(0.0, ((machine_busy_s() - busy) - (own_cpu_s() - own)) / wall)
    decode_peak = hwm_bytes()
    if len(tokens) != workload.new_tokens:
        raise RuntimeError(f"garrison generated {len(tokens)} tokens at {length}, expected {workload.new_tokens}")
    kv_bytes = engine.num_blocks * workload.block_size * engine.model_config.kv_bytes_per_token(DTYPE_BYTES)
    return Row(length, workload.new_tokens, tokens, logprobs, load_s, prefill_s, steps, last_step_s, decode_s,
               others, kv_bytes, engine.num_blocks, baseline, load_peak, prefill_peak, decode_peak, rss_bytes(),
               reset_ok)


# -- the transformers reference (child process) -----------------------------------------------------


@dataclass(slots=True)
class Reference:
    prompt_tokens: int
    attn_implementation: str
    tokens: list[int]
    logprobs: list[float]
    wall_s: float
    peak_rss: int


def run_reference(model_dir: Path, length: int, workload: Workload, attn: str) -> Reference:
    """transformers' greedy generate on the same model and prompt, with the raw logits of each step."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    prompt = make_prompt(length, model.config.vocab_size, workload.seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=workload.new_tokens,
                             min_new_tokens=workload.new_tokens, eos_token_id=None, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    wall = time.perf_counter() - start
    tokens = out.sequences[0, length:].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), dim=-1)[token]) for step, token in zip(out.logits, tokens)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return Reference(length, attn, tokens, logprobs, wall, peak)


# -- the run (parent process) -----------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    machine: Machine
    workload: Workload
    quick: bool
    engine_config: dict[str, Any]
    model: dict[str, Any]
    kv_bytes_per_token: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    reference_row: dict[str, Any] | None = None  # Garrison at the reference length
    wall_s: float = 0.0

    def comparison(self) -> dict[str, Any] | None:
        if self.reference is None or self.reference_row is None:
            return None
        ours, theirs = self.reference_row, self.reference
        same = 0
        while same < len(ours["tokens"]) and same < len(theirs["tokens"]) \
                and ours["tokens"][same] == theirs["tokens"][same]:
            same += 1
        # Log-probabilities are comparable up to and including the first differing position.
        compared = min(same + 1, len(ours["tokens"]), len(theirs["tokens"]))
        diffs = [abs(a - b) for a, b in zip(ours["logprobs"][:compared], theirs["logprobs"][:compared])]
        return {"match": ours["tokens"] == theirs["tokens"], "matching_prefix": same,
                "max_abs_logprob_diff": max(diffs) if diffs else math.nan}


def child(args: list[str], what: str) -> dict[str, Any]:
    progress(what)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what}: the child process exited with status {done.returncode}")
    return json.loads(done.stdout)


def workload_args(workload: Workload) -> list[str]:
    return ["--seed", str(workload.seed), "--new-tokens", str(workload.new_tokens), "--num-kv-blocks",
            str(workload.num_kv_blocks), "--chunk", str(workload.max_num_batched_tokens),
            "--key-block", str(workload.attention_key_block), "--threads", str(workload.threads)]


def run_benchmark(workload: Workload, quick: bool, attn: str) -> Report:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="garrison-long-context-") as tmp:
        model_dir = Path(tmp)
        progress("building and saving the tiny Llama 4")
        raw = save_model(model_dir)
        report = Report(machine_facts(), workload, quick, engine_config_dict(workload.engine_config()), raw)
        from garrison_workers.config import from_hf_config
        report.kv_bytes_per_token = from_hf_config(raw).kv_bytes_per_token(DTYPE_BYTES)
        common = ["--model-dir", str(model_dir), *workload_args(workload)]
        ref_len = workload.reference_length
        if ref_len:
            report.reference = child(["--reference", str(ref_len), "--hf-attn", attn, *common],
                                     f"transformers ({attn}) at {ref_len} tokens")
        for length in sorted(set(workload.lengths) | ({ref_len} if ref_len else set())):
            row = child(["--one", str(length), *common], f"garrison at {length} tokens")
            if length == ref_len:
                report.reference_row = row
            report.rows.append(row)  # the reference length too: one more point at the same cache size
    report.machine.load_average_end = os.getloadavg()
    report.wall_s = time.perf_counter() - started
    return report


# -- output -----------------------------------------------------------------------------------------


def slope(rows: list[dict[str, Any]], key: str) -> float:
    """Bytes per prompt token: the least-squares slope of `key` against prompt length (nan below 2 lengths)."""
    xs, ys = [row["prompt_tokens"] for row in rows], [row[key] for row in rows]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else math.nan


def mib(value: float) -> str:
    return f"{value / MiB:.0f}"


def render(report: Report) -> str:
    m, w, r = report.machine, report.workload, report.model
    mode = "QUICK (smoke test: 8k and 16k)" if report.quick else "full"
    kv = report.rows[0]["kv_cache_bytes"] if report.rows else 0
    lines = [
        "Long context on CPU: tiny random Llama 4 (chunked-local RoPE layers + a global NoPE layer), fp32",
        f"machine    {m.cpu}; os.cpu_count {m.os_cpu_count}; torch threads {m.torch_threads}; RAM {m.ram_gib:.1f} GiB",
        f"software   torch {m.torch_version}; transformers {m.transformers_version}; python {m.python_version}",
        f"date       {m.date}; load average start {fmt_load(m.load_average_start)}, end {fmt_load(m.load_average_end)}",
        f"mode       {mode}; run wall time {report.wall_s:.0f} s",
        (f"model      {r['num_hidden_layers']} layers (RoPE layers chunked at {r['attention_chunk_size']} tokens;"
         f" every {r['no_rope_layer_interval']}th layer global NoPE, temperature tuning floor {r['floor_scale']});"
         f" hidden {r['hidden_size']}, {r['num_attention_heads']} heads / {r['num_key_value_heads']} KV heads x"
         f" {r['head_dim']}, {r['num_local_experts']} experts top-{r['num_experts_per_tok']}, vocab {r['vocab_size']}"),
        (f"workload   one prompt per length, random token ids (seed {w.seed}), each in a fresh process;"
         f" {w.new_tokens} new tokens, greedy, EOS ignored"),
        (f"garrison   block {w.block_size}; prefill chunk (max_num_batched_tokens) {w.max_num_batched_tokens};"
         f" attention_key_block {w.attention_key_block}; prefix cache off; KV cache preallocated for"
         f" {w.cache_tokens} tokens: {w.num_kv_blocks} blocks x {w.block_size} x {report.kv_bytes_per_token} B ="
         f" {kv / MiB:.0f} MiB, the same in every row"),
        "",
        "time",
        (f"{'prompt tok':>10}{'prefill s':>11}{'prefill tok/s':>15}{'steps':>7}{'last step s':>13}"
         f"{'decode ms/tok':>15}{'load s':>8}{'others':>8}"),
    ]
    for row in report.rows:
        lines.append(f"{row['prompt_tokens']:>10}{row['prefill_s']:>11.1f}{row['prefill_tok_s']:>15.0f}"
                     f"{row['prefill_steps']:>7}{row['last_prefill_step_s']:>13.2f}{row['decode_ms_per_token']:>15.1f}"
                     f"{row['load_s']:>8.1f}{row['others_cores']:>8.2f}")
    lines += [
        "",
        "memory (MiB; RSS from /proc/self/status, one process per row)",
        (f"{'prompt tok':>10}{'KV cache':>10}{'baseline':>10}{'prefill pk':>12}{'decode pk':>11}{'peak':>8}"
         f"{'peak - KV':>11}{'peak - base':>13}"),
    ]
    for row in report.rows:
        lines.append(f"{row['prompt_tokens']:>10}{mib(row['kv_cache_bytes']):>10}{mib(row['baseline_rss']):>10}"
                     f"{mib(row['prefill_peak_rss']):>12}{mib(row['decode_peak_rss']):>11}{mib(row['peak_rss']):>8}"
                     f"{mib(row['peak_minus_kv']):>11}{mib(row['peak_minus_baseline']):>13}")
    if report.rows:
        margins = [row["peak_minus_kv"] for row in report.rows]
        added = [row["peak_minus_baseline"] for row in report.rows]
        lines += [
            (f"spread     peak - KV from {mib(min(margins))} to {mib(max(margins))} MiB across"
             f" {report.rows[0]['prompt_tokens']}..{report.rows[-1]['prompt_tokens']} tokens"
             f" (peak - baseline {mib(min(added))} to {mib(max(added))} MiB); a KV cache sized to each prompt"
             f" would be {report.kv_bytes_per_token} B/token x prompt"),
        ]
        lengths = [row["prompt_tokens"] for row in report.rows]
        if max(lengths) >= 8 * min(lengths):  # over a narrower range the allocator's few MiB of noise dominate
            lines.append(
                f"growth     least-squares slope over the rows: peak {slope(report.rows, 'peak_rss'):.0f} B per prompt"
                f" token, prefill peak {slope(report.rows, 'prefill_peak_rss'):.0f}, decode peak"
                f" {slope(report.rows, 'decode_peak_rss'):.0f} (the KV cache itself: {report.kv_bytes_per_token} B/token)")
        if not all(row["peak_reset_ok"] for row in report.rows):
            lines.append("note       VmHWM could not be reset: each phase's peak includes the phases before it")
    lines += ["", "method     baseline = RSS after loading the model and allocating (zero-filling) the KV cache;",
              "           prefill pk / decode pk = VmHWM of each phase (reset in between); peak = the larger, with",
              "           the load peak; last step = the prefill step with the longest context; others = cores",
              "           other processes kept busy meanwhile (well above 0: the time figures were disturbed)",
              "", "first tokens (garrison, greedy)"]
    for row in report.rows:
        lines.append(f"{row['prompt_tokens']:>10}  {row['tokens']}")
    comparison = report.comparison()
    if comparison is not None:
        ref, ours = report.reference, report.reference_row
        assert ref is not None and ours is not None
        lines += [
            "",
            (f"reference  transformers generate ({ref['attn_implementation']} attention), same model and"
             f" {ref['prompt_tokens']}-token prompt, {report.workload.new_tokens} greedy tokens"
             f" ({ref['wall_s']:.1f} s, peak RSS {mib(ref['peak_rss'])} MiB)"),
            f"           transformers {ref['tokens']}",
            f"           garrison     {ours['tokens']}",
            (f"           match {'yes' if comparison['match'] else 'NO'}"
             f" ({comparison['matching_prefix']}/{len(ref['tokens'])} tokens);"
             f" max |logprob difference| {comparison['max_abs_logprob_diff']:.2e}"),
        ]
    return "\n".join(lines)


def to_json(report: Report) -> str:
    body = {
        "machine": asdict(report.machine), "workload": asdict(report.workload), "quick": report.quick,
        "engine_config": report.engine_config, "model": report.model, "kv_bytes_per_token": report.kv_bytes_per_token,
        "wall_s": report.wall_s, "rows": report.rows, "reference": report.reference,
        "reference_row": report.reference_row, "comparison": report.comparison(),
    }
    return json.dumps(finite_or_none(body), indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8k and 16k only: a smoke test of the script")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--lengths", type=int, nargs="+", help="prompt lengths instead of the default set")
    parser.add_argument("--reference-length", type=int, help="transformers' check length (0: skip; default 8192)")
    parser.add_argument("--hf-attn", default="eager", choices=("eager", "sdpa"), help="transformers attention")
    parser.add_argument("--new-tokens", type=int, help="greedy tokens per prompt (default 8)")
    parser.add_argument("--seed", type=int, help="prompt seed (default 0)")
    parser.add_argument("--chunk", type=int, help="max_num_batched_tokens, the prefill chunk (default 2048)")
    parser.add_argument("--key-block", type=int, help="attention_key_block (default 4096)")
    parser.add_argument("--threads", type=int, help="torch threads in every child (default: torch's own choice)")
    # Internal: one child process's work.
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--num-kv-blocks", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    base = QUICK if args.quick else FULL
    overrides = {name: value for name, value in (
        ("lengths", tuple(args.lengths) if args.lengths else None), ("reference_length", args.reference_length),
        ("new_tokens", args.new_tokens), ("seed", args.seed), ("max_num_batched_tokens", args.chunk),
        ("attention_key_block", args.key_block), ("threads", args.threads)) if value is not None}
    workload = Workload(**{**asdict(base), **overrides})
    if workload.threads:
        torch.set_num_threads(workload.threads)

    if args.one is not None or args.reference is not None:
        if args.model_dir is None or args.num_kv_blocks is None:
            parser.error("--one and --reference need --model-dir and --num-kv-blocks")
        # The parent sized the cache for its whole run: rebuild a workload whose cache matches it.
        workload = Workload(**{**asdict(workload), "lengths": (args.num_kv_blocks * workload.block_size
                                                               - workload.new_tokens,), "reference_length": 0})
        if workload.num_kv_blocks != args.num_kv_blocks:
            raise SystemExit(f"cache size mismatch: {workload.num_kv_blocks} != {args.num_kv_blocks} blocks")
        if args.one is not None:
            print(json.dumps(finite_or_none(run_one(args.model_dir, args.one, workload).to_dict())))
        else:
            print(json.dumps(asdict(run_reference(args.model_dir, args.reference, workload, args.hf_attn))))
        return 0

    report = run_benchmark(workload, args.quick, args.hf_attn)
    print(to_json(report) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
