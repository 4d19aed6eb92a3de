"""Expert parallelism at ep = 1, 2, 4 (tp = 1) on one tiny-but-wide random Llama 4 MoE, fp32, on this CPU.

    .venv/bin/python ops/bench/moe_parallel.py [--quick] [--json]

One run builds a random Llama 4 text model per top-k (1 and 2: the same weights, only the routing k
differs), saves it with transformers, and serves it with Garrison's engine at ep = 1 (one process),
ep = 2 and ep = 4 (a Ray worker group, one rank per expert shard). For every (top-k, ep) it times
individual engine steps: prefill steps that compute one 256-token chunk of one prompt, and decode
steps of 8 sequences that are all past their prompts. It reads the all-to-all bytes the ranks sent to
each other (their own share excluded) and prints them per token and per token per MoE layer, next to
what uniform routing predicts, and each rank's resident weight bytes.

Every engine sees the same prompts (fixed seed), so the same tokens go to the same experts at every
ep: only where the experts live changes. This machine may have fewer cores than ranks: then ep > 1
measures what dispatching a step costs (Ray calls, gloo collectives, attention repeated on every
rank), not a speedup. A benchmark prints figures; it asserts nothing about time (DESIGN.md, rule 9).
Progress goes to stderr, so `--json` leaves stdout pure JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from _common import (  # this folder is on sys.path: the benchmarks run as scripts
    Machine,
    engine_config_dict,
    finite_or_none,
    fmt,
    fmt_load,
    machine_busy_s,
    machine_facts,
    progress,
)
from garrison_workers.config import tiny_llama4
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.parallel.dims import ParallelDims
from garrison_workers.worker_group import start_local_ray

MB = 1e6
FIRST_TOKEN_ID = 3  # 0, 1, 2 are pad, BOS and EOS in tiny_llama4
DISTURBED_CORES = 0.1  # "others" above this: a row shared the machine with someone else
RAY_CPUS = 4  # one Ray CPU slot per rank at ep = 4, whatever the core count

# Wide for its size: ~100 MB of expert weights per MoE layer, so a rank's share of the experts is the
# bulk of what it holds. Real Llama 4 attention settings (chunk 8192, floor 8192) instead of the
# test defaults, which make local attention matter within a few dozen tokens.
MODEL_OVERRIDES: dict[str, Any] = dict(
    vocab_size=2048, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=16, interleave_moe_layer_step=1,
    attention_chunk_size=8192, floor_scale=8192, max_position_embeddings=4096)


# -- workload and results ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Workload:
    top_ks: tuple[int, ...]
    eps: tuple[int, ...]
    prefill_chunks: int  # timed prefill steps per engine, one 256-token chunk (one whole prompt) each
    decode_steps: int  # timed decode steps per engine, every one over the whole batch
    prefill_chunk_tokens: int = 256
    decode_batch: int = 8
    decode_prompt_tokens: int = 128
    warmup_decode_steps: int = 2
    max_attempts: int = 2  # timed phases per engine while other processes disturb them
    seed: int = 0

    def engine_config(self) -> EngineConfig:
        context = self.decode_prompt_tokens + self.decode_steps + self.decode_margin
        blocks = self.decode_batch * -(-context // 16) + -(-self.prefill_chunk_tokens // 16) + 16
        return EngineConfig(block_size=16, num_kv_blocks=blocks, max_num_batched_tokens=self.prefill_chunk_tokens)

    @property
    def decode_margin(self) -> int:
        """Tokens each decode request may generate beyond the timed steps: sequences that finished their
        prompt early decode while the others still prefill; they are aborted once the timed steps are done."""
        return -(-self.decode_batch * self.decode_prompt_tokens // self.prefill_chunk_tokens) + 2


FULL = Workload(top_ks=(1, 2), eps=(1, 2, 4), prefill_chunks=12, decode_steps=48)
QUICK = Workload(top_ks=(1,), eps=(1, 2, 4), prefill_chunks=2, decode_steps=4, warmup_decode_steps=1,
                 max_attempts=1)


@dataclass(slots=True)
class ModelFacts:
    hidden_size: int
    expert_intermediate_size: int
    num_experts: int
    num_layers: int
    num_moe_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    parameters: int  # every parameter once (same at every top-k)
    weight_bytes: int
    build_s: float  # random init + save_pretrained, both models


@dataclass(slots=True)
class Row:
    top_k: int
    ep: int
    load_s: float  # LLMEngine.from_path: build and load the model, start and set up the group
    threads_per_rank: list[int]  # torch intra-op threads of each rank (the driver's at ep = 1)
    resident_weight_bytes: list[int]  # per rank
    prefill_ms: list[float]  # each timed prefill step
    decode_ms: list[float]  # each timed decode step
    prefill_tokens: int
    decode_tokens: int
    prefill_a2a_bytes: int  # sent to other ranks during the timed prefill steps, all ranks and MoE layers
    decode_a2a_bytes: int
    call_ms: list[float]  # a call that does no work on every rank and back (ep > 1 only)
    expert_load_max_over_mean: float  # routing imbalance, averaged over MoE layers (ep > 1 only; nan at ep = 1)
    others_cores: float  # cores that processes outside this run kept busy during the timed phases
    attempts: int  # timed phases run (again while disturbed, up to Workload.max_attempts); the cleanest kept

    def figures(self, hidden: int, moe_layers: int) -> dict[str, float]:
        prefill_s, decode_s = sum(self.prefill_ms) / 1e3, sum(self.decode_ms) / 1e3
        a2a_per_token = (self.prefill_a2a_bytes + self.decode_a2a_bytes) / (self.prefill_tokens + self.decode_tokens)
        theory_per_layer = (self.ep - 1) / self.ep * self.top_k * hidden * 4 * 2
        return {
            "prefill_ms_median": statistics.median(self.prefill_ms), "prefill_ms_min": min(self.prefill_ms),
            "decode_ms_median": statistics.median(self.decode_ms), "decode_ms_min": min(self.decode_ms),
            "prefill_tok_s": self.prefill_tokens / prefill_s, "decode_tok_s": self.decode_tokens / decode_s,
            "prefill_a2a_bytes_per_token": self.prefill_a2a_bytes / self.prefill_tokens,
            "decode_a2a_bytes_per_token": self.decode_a2a_bytes / self.decode_tokens,
            "a2a_bytes_per_token": a2a_per_token,
            "a2a_bytes_per_token_per_moe_layer": a2a_per_token / moe_layers,
            "theory_a2a_bytes_per_token_per_moe_layer": theory_per_layer,
            # Not in the a2a figure: after the experts, each rank all_gathers the other ranks' token slices.
            "theory_all_gather_bytes_per_token_per_moe_layer": (self.ep - 1) * hidden * 4.0,
            "call_ms_median": statistics.median(self.call_ms) if self.call_ms else math.nan,
        }

    def to_dict(self, hidden: int, moe_layers: int) -> dict[str, Any]:
        return {**asdict(self), **self.figures(hidden, moe_layers)}


@dataclass(slots=True)
class Report:
    machine: Machine
    ray_version: str
    workload: Workload
    quick: bool
    engine_config: dict[str, Any]
    model: ModelFacts | None = None
    rows: list[Row] = field(default_factory=list)
    wall_s: float = 0.0

    def row(self, top_k: int, ep: int) -> Row:
        return next(r for r in self.rows if r.top_k == top_k and r.ep == ep)


# -- the model --------------------------------------------------------------------------------------


def save_model(directory: Path, top_k: int, seed: int) -> int:
    """A random Llama4ForCausalLM saved with save_pretrained (as tests/conftest.py does); its parameter count."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    raw = tiny_llama4(**MODEL_OVERRIDES, num_experts_per_tok=top_k)
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(Llama4TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})).eval()
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def build_models(root: Path, workload: Workload) -> tuple[dict[int, Path], ModelFacts]:
    start = time.perf_counter()
    paths, parameters = {}, 0
    for top_k in workload.top_ks:
        progress(f"model: top-{top_k}: random init and save_pretrained")
        paths[top_k] = root / f"llama4-wide-top{top_k}"
        parameters = save_model(paths[top_k], top_k, workload.seed)
    raw = tiny_llama4(**MODEL_OVERRIDES)
    layers = raw["num_hidden_layers"]
    moe_layers = len(range(raw["interleave_moe_layer_step"] - 1, layers, raw["interleave_moe_layer_step"]))
    facts = ModelFacts(raw["hidden_size"], raw["intermediate_size"], raw["num_local_experts"], layers, moe_layers,
                       raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"], raw["vocab_size"],
                       parameters, parameters * 4, time.perf_counter() - start)
    return paths, facts


# -- measuring --------------------------------------------------------------------------------------


def a2a_bytes(engine: LLMEngine) -> int:
    """All-to-all bytes the ranks have sent to other ranks so far; one process (ep = 1) sends none."""
    sent = getattr(engine.executor, "a2a_bytes_sent", None)
    return sent() if sent is not None else 0


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(length)]


def prefill_steps(engine: LLMEngine, rng: random.Random, workload: Workload, tag: str, count: int
                  ) -> tuple[list[float], int]:
    """`count` prompts of one chunk each, one at a time; (ms of each prefill step, a2a bytes sent meanwhile)."""
    vocab, times = engine.model_config.vocab_size, []
    before = a2a_bytes(engine)
    for index in range(count):
        request_id = f"{tag}-prefill-{index}"
        engine.add_request(request_id, random_prompt(rng, workload.prefill_chunk_tokens, vocab),
                           SamplingParams(max_tokens=1, ignore_eos=True), salt=request_id.encode())
        start = time.perf_counter()
        outputs = engine.step()
        times.append((time.perf_counter() - start) * 1e3)
        # One step finished the request: the whole prompt was one chunk, computed in that step.
        if len(outputs) != 1 or not outputs[0].finished or engine.has_unfinished_requests():
            raise RuntimeError(f"{tag}: a {workload.prefill_chunk_tokens}-token prompt took more than one step")
    return times, a2a_bytes(engine) - before


def decode_steps(engine: LLMEngine, rng: random.Random, workload: Workload, tag: str, count: int
                 ) -> tuple[list[float], int]:
    """A batch of prompts run until every sequence decodes, then `count` timed steps of the whole batch;
    (ms of each timed step, a2a bytes sent during them)."""
    vocab, batch = engine.model_config.vocab_size, workload.decode_batch
    params = SamplingParams(max_tokens=count + workload.decode_margin, ignore_eos=True)
    emitted: dict[str, int] = {}
    for index in range(batch):
        request_id = f"{tag}-decode-{index}"
        engine.add_request(request_id, random_prompt(rng, workload.decode_prompt_tokens, vocab), params,
                           salt=request_id.encode())
        emitted[request_id] = 0
    while not all(emitted.values()):  # the prompts' chunks, some of them mixed with early decodes
        for out in engine.step():
            emitted[out.request_id] += len(out.new_token_ids)
            if out.finished:
                raise RuntimeError(f"{tag}: {out.request_id} finished before the timed decode steps")
    times = []
    before = a2a_bytes(engine)
    for _ in range(count):
        start = time.perf_counter()
        outputs = engine.step()
        times.append((time.perf_counter() - start) * 1e3)
        if len(outputs) != batch or any(out.finished for out in outputs):
            raise RuntimeError(f"{tag}: a decode step produced {len(outputs)} tokens, expected {batch}")
    sent = a2a_bytes(engine) - before
    for request_id in emitted:
        engine.abort_request(request_id)
    return times, sent


def tree_cpu_s() -> dict[int, float]:
    """CPU seconds used so far by this process and each live descendant (Ray's processes, the ranks), by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields_ = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        pid = int(entry.name)
        parent[pid], cpu[pid] = int(fields_[1]), (int(fields_[11]) + int(fields_[12])) / tick
    ours, frontier = {os.getpid()}, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in ours:
                ours.add(child)
                frontier.append(child)
    return {pid: cpu[pid] for pid in ours if pid in cpu}


def tree_cpu_since(before: dict[int, float]) -> float:
    """CPU seconds this run's processes used since `before`. A process that ended meanwhile (a rank of the
    previous group, killed asynchronously) is left out rather than subtracted."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in tree_cpu_s().items())


def rank_threads(engine: LLMEngine) -> list[int]:
    actors = getattr(engine.executor, "actors", None)
    if not actors:
        return [torch.get_num_threads()]
    try:
        return ray.get([actor.__ray_call__.remote(lambda _self: torch.get_num_threads()) for actor in actors])
    except Exception:  # noqa: BLE001 - a figure for the table only
        return []


def expert_imbalance(engine: LLMEngine) -> float:
    """Max over mean tokens per expert, averaged over MoE layers; nan where the executor does not count."""
    per_layer = [max(c) / (sum(c) / len(c)) for c in engine.executor.expert_load().values() if sum(c)]
    return statistics.mean(per_layer) if per_layer else math.nan


@dataclass(slots=True)
class Attempt:
    prefill_ms: list[float]
    prefill_sent: int
    decode_ms: list[float]
    decode_sent: int
    others_cores: float


def timed_attempt(engine: LLMEngine, workload: Workload, tag: str) -> Attempt:
    rng = random.Random(workload.seed)  # the same prompts at every attempt, ep and top-k (fresh salts: no cache hits)
    busy, ours, start = machine_busy_s(), tree_cpu_s(), time.perf_counter()
    prefill_ms, prefill_sent = prefill_steps(engine, rng, workload, tag, workload.prefill_chunks)
    decode_ms, decode_sent = decode_steps(engine, rng, workload, tag, workload.decode_steps)
    elapsed = time.perf_counter() - start
    others = ((machine_busy_s() - busy) - tree_cpu_since(ours)) / elapsed
    progress(f"{tag}: prefill {statistics.median(prefill_ms):7.1f} ms/chunk, decode {statistics.median(decode_ms):7.1f}"
             f" ms/step, a2a {prefill_sent + decode_sent} B, others {max(0.0, others):.2f} cores")
    return Attempt(prefill_ms, prefill_sent, decode_ms, decode_sent, max(0.0, others))


def measure_engine(path: Path, top_k: int, ep: int, workload: Workload, config: EngineConfig) -> Row:
    tag = f"top{top_k}-ep{ep}"
    progress(f"{tag}: loading")
    start = time.perf_counter()
    engine = LLMEngine.from_path(path, config, ParallelDims(ep=ep))
    load_s = time.perf_counter() - start
    try:
        rng = random.Random(workload.seed + 1)  # warm-up prompts: other ids than the timed ones
        prefill_steps(engine, rng, workload, f"{tag}-warmup", 1)
        decode_steps(engine, rng, workload, f"{tag}-warmup", workload.warmup_decode_steps)
        # On a shared machine, measure again while other processes keep cores busy; keep the cleanest.
        attempts = [timed_attempt(engine, workload, f"{tag}-attempt0")]
        while attempts[-1].others_cores >= DISTURBED_CORES and len(attempts) < workload.max_attempts:
            attempts.append(timed_attempt(engine, workload, f"{tag}-attempt{len(attempts)}"))
        kept = min(attempts, key=lambda a: a.others_cores)
        call_ms = [seconds_ms(lambda: a2a_bytes(engine)) for _ in range(5)] if ep > 1 else []
        return Row(top_k, ep, load_s, rank_threads(engine), engine.executor.resident_weight_bytes(),
                   kept.prefill_ms, kept.decode_ms, workload.prefill_chunks * workload.prefill_chunk_tokens,
                   workload.decode_steps * workload.decode_batch, kept.prefill_sent, kept.decode_sent, call_ms,
                   expert_imbalance(engine), kept.others_cores, len(attempts))
    finally:
        engine.shutdown()


def seconds_ms(action: Any) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1e3


# -- the run ----------------------------------------------------------------------------------------


def run_benchmark(quick: bool) -> Report:
    started = time.perf_counter()
    workload = QUICK if quick else FULL
    config = workload.engine_config()
    report = Report(machine_facts(), ray.__version__, workload, quick, engine_config_dict(config))
    # Enough CPU slots for one rank each at ep = 4, on any core count; the ranks then share the cores.
    start_local_ray(RAY_CPUS)
    try:
        with tempfile.TemporaryDirectory(prefix="garrison-moe-bench-") as root:
            paths, report.model = build_models(Path(root), workload)
            for top_k in workload.top_ks:
                for ep in workload.eps:
                    report.rows.append(measure_engine(paths[top_k], top_k, ep, workload, config))
    finally:
        ray.shutdown()
    report.machine.load_average_end = os.getloadavg()
    report.wall_s = time.perf_counter() - started
    return report


# -- output -----------------------------------------------------------------------------------------


def render(report: Report) -> str:
    return "\n".join([*header_lines(report), "", *time_lines(report), "", *traffic_lines(report), "",
                      *note_lines(report)])


def header_lines(report: Report) -> list[str]:
    m, w, c, model = report.machine, report.workload, report.engine_config, report.model
    assert model is not None
    mode = "QUICK (smoke test: fewer steps)" if report.quick else "full"
    return [
        f"Garrison expert parallelism, ep = {', '.join(map(str, w.eps))} (tp = 1): random Llama 4 MoE, fp32, CPU",
        f"machine    {m.cpu}; os.cpu_count {m.os_cpu_count}; torch threads {m.torch_threads}; RAM {m.ram_gib:.1f} GiB",
        f"software   torch {m.torch_version}; transformers {m.transformers_version}; ray {report.ray_version};"
        f" python {m.python_version}",
        f"date       {m.date}; load average start {fmt_load(m.load_average_start)}, end {fmt_load(m.load_average_end)}",
        f"mode       {mode}; run wall time {report.wall_s:.0f} s (models built and saved in {model.build_s:.1f} s)",
        f"model      hidden {model.hidden_size}; {model.num_experts} experts of intermediate"
        f" {model.expert_intermediate_size} + a shared expert; {model.num_layers} layers, {model.num_moe_layers} MoE;"
        f" heads {model.num_heads} / kv {model.num_kv_heads} x {model.head_dim}; vocab {model.vocab_size};",
        f"           {model.parameters / 1e6:.1f} M parameters, {model.weight_bytes / MB:.0f} MB fp32; top-k"
        f" {' and '.join(map(str, w.top_ks))} (one model each, the same weights, seed {w.seed})",
        f"workload   prefill: {w.prefill_chunks} steps, each one {w.prefill_chunk_tokens}-token chunk (a whole prompt"
        f" of one request); decode: {w.decode_steps} steps of {w.decode_batch} sequences",
        f"           ({w.decode_prompt_tokens}-token prompts, timed once all {w.decode_batch} decode); random token"
        f" ids, the same at every ep; a warm-up prefill and {w.warmup_decode_steps} decode step(s) per engine first",
        f"engine     block {c['block_size']}, {c['num_kv_blocks']} KV blocks, max_num_batched_tokens"
        f" {c['max_num_batched_tokens']}; ep = 1 in this process, ep > 1 a Ray worker group (ray.init num_cpus"
        f" {RAY_CPUS})",
        f"caution    {m.os_cpu_count} cores for up to {max(w.eps)} ranks and this driver: ep > 1 rows measure what"
        " dispatching a step costs (Ray calls, gloo",
        "           collectives, attention repeated on every rank), not a speedup; the ratios to ep = 1 are printed"
        " all the same",
        *disturbed_lines(report),
    ]


def disturbed_lines(report: Report) -> list[str]:
    worst = max((r.others_cores for r in report.rows), default=0.0)
    if worst < DISTURBED_CORES:
        return []
    rows = ", ".join(f"top-{r.top_k} ep {r.ep}" for r in report.rows if r.others_cores >= DISTURBED_CORES)
    return [f"WARNING    other processes kept up to {worst:.2f} of {report.machine.os_cpu_count} cores busy during"
            f" timed steps ({rows}): those times are not clean; rerun on a quiet machine"]


def time_lines(report: Report) -> list[str]:
    model = report.model
    assert model is not None
    lines = ["time per step (median and best of the timed steps); x ep1 = median / ep = 1 median (above 1: slower)",
             f"{'top-k':>5}{'ep':>4}{'load s':>8}{'threads':>9}{'prefill ms':>12}{'best':>8}{'decode ms':>11}"
             f"{'best':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'prefill x ep1':>15}{'decode x ep1':>14}"
             f"{'call ms':>9}{'others':>8}{'tries':>6}"]
    for r in report.rows:
        if r.ep == report.workload.eps[0] and len(lines) > 2:
            lines.append("")
        f = r.figures(model.hidden_size, model.num_moe_layers)
        base = report.row(r.top_k, report.workload.eps[0]).figures(model.hidden_size, model.num_moe_layers)
        threads = "/".join(map(str, r.threads_per_rank)) or "?"
        lines.append(
            f"{r.top_k:>5}{r.ep:>4}{r.load_s:>8.1f}{threads:>9}{f['prefill_ms_median']:>12.1f}{f['prefill_ms_min']:>8.1f}"
            f"{f['decode_ms_median']:>11.1f}{f['decode_ms_min']:>8.1f}{f['prefill_tok_s']:>15.0f}{f['decode_tok_s']:>14.0f}"
            f"{fmt(f['prefill_ms_median'] / base['prefill_ms_median'], 15, 2, 'x')}"
            f"{fmt(f['decode_ms_median'] / base['decode_ms_median'], 14, 2, 'x')}"
            f"{fmt(f['call_ms_median'], 9, 1)}{r.others_cores:>8.2f}{r.attempts:>6}")
    return lines


def traffic_lines(report: Report) -> list[str]:
    model = report.model
    assert model is not None
    lines = ["all-to-all bytes sent to other ranks (own share excluded) and resident weights",
             f"{'top-k':>5}{'ep':>4}{'weights MB per rank':>24}{'a2a B/tok prefill':>19}{'decode':>8}"
             f"{'per MoE layer':>15}{'theory':>8}{'measured/theory':>17}{'expert load max/mean':>22}"]
    for r in report.rows:
        if r.ep == report.workload.eps[0] and len(lines) > 2:
            lines.append("")
        f = r.figures(model.hidden_size, model.num_moe_layers)
        theory = f["theory_a2a_bytes_per_token_per_moe_layer"]
        ratio = f["a2a_bytes_per_token_per_moe_layer"] / theory if theory else math.nan
        weights = " ".join(f"{b / MB:.0f}" for b in r.resident_weight_bytes)
        lines.append(
            f"{r.top_k:>5}{r.ep:>4}{weights:>24}{f['prefill_a2a_bytes_per_token']:>19.0f}"
            f"{f['decode_a2a_bytes_per_token']:>8.0f}{f['a2a_bytes_per_token_per_moe_layer']:>15.0f}{theory:>8.0f}"
            f"{fmt(ratio, 17, 3)}{fmt(r.expert_load_max_over_mean, 22, 2)}")
    return lines


def note_lines(report: Report) -> list[str]:
    model = report.model
    assert model is not None
    h = model.hidden_size
    gathers = ", ".join(f"ep {ep}: {(ep - 1) * h * 4} B" for ep in report.workload.eps if ep > 1)
    return [
        "columns    prefill ms / decode ms: one engine.step(), driver's view (scheduling, Ray call, every rank, sampling);",
        "           threads: torch intra-op threads per rank (the driver's at ep = 1); call ms: a call that does",
        "           no work on every rank and back (the Ray fan-out a step pays at least); others: cores that",
        "           processes outside this run kept busy while the timed steps ran (well above 0: disturbed);",
        f"           tries: timed phases run on that engine; while others >= {DISTURBED_CORES} the phase runs again (up to"
        f" {report.workload.max_attempts}), the cleanest kept",
        "theory     (ep-1)/ep x top-k x hidden x 4 B x 2 (to the expert's rank and back) per token per MoE layer,"
        " uniform routing;",
        "           measured also counts each pair's expert id (int64, 8 B) sent along; not the pair counts",
        "not in a2a the EP all_gather after the experts: every rank sends its token slice to every other, (ep-1) x"
        " hidden x 4 B per token",
        f"           per MoE layer ({gathers})",
        "expert     load max/mean: tokens per expert over the engine's life (warm-up included), max over mean,"
        " averaged over MoE",
        "           layers (counted by ep > 1 ranks only); 1.0 is perfectly even",
    ]


def to_json(report: Report) -> str:
    model = report.model
    assert model is not None
    body = {
        "machine": asdict(report.machine), "ray_version": report.ray_version, "workload": asdict(report.workload),
        "quick": report.quick, "engine_config": report.engine_config, "model": asdict(model), "wall_s": report.wall_s,
        "rows": [r.to_dict(model.hidden_size, model.num_moe_layers) for r in report.rows],
    }
    return json.dumps(finite_or_none(body), indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: a smoke test of the script")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args()
    report = run_benchmark(args.quick)
    print(to_json(report) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
