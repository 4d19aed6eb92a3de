"""Disaggregated prefill/decode against colocated, under long prompts, on a tiny random Llama 4 on this CPU.

    .venv/bin/python ops/bench/disagg.py [--quick] [--json] [--threads N] [--kv-transport ray|torch]

Garrison issue 4. Eight streaming requests decode while long prompts keep arriving (closed loop: the
next long prompt arrives as soon as the previous one has its first token, so there is always a prompt
being prefilled). The same workload runs through two systems, one after the other, in one process:

- colocated: one `LLMEngine` in this process; chunked prefill interleaves each long prompt's chunks
  with the streams' decode steps under one token budget;
- disaggregated: a `DisaggregatedEngine` whose prefill engine is a Ray worker group (one actor, one
  torch thread) and whose decode engine runs in this process (one torch thread), with the KV cache
  handed over through Ray's object store. A prefill step stays in flight across decode steps; the
  decode engine never waits for it. The prefill side must be the Ray group: a local engine computes
  synchronously inside `begin_step`. With `--kv-transport torch` the decode engine is a Ray worker group
  too (one actor, one torch thread) and the KV goes over a torch.distributed channel between the two
  groups (gloo here; NCCL between GPUs), received in the background and imported a slice per step.

Each stream is a run of requests: a finished one is replaced by the next at once, so short prompts keep
arriving (and, disaggregated, being prefilled and handed over) whether or not long ones do.

Figures: p50/p99 time per output token (TPOT: gaps between consecutive tokens of a stream's request
while long prompts are arriving) and time to first token (TTFT) of the streams and of each long prompt
(the streams' first requests, timed over 16 starts of the loaded phase: its own, and 15 alone on the idle
engine, five before the baseline, five just before the loaded phase and five after it, each stopped once
every stream has its first token, since one start's TTFTs are one draw of when a few prefill steps came
back, and starts back to back all fall within a second or two of a host whose speed drifts);
the same streams with no long prompt arriving, for 20 s of steady state (the baseline: thousands of
steps, so its p99 is not a handful of samples); the ratio disaggregated p99
TPOT / baseline p99 TPOT (issue 4's target: at most 1.5x); how long the disaggregated steps that
finish a prefill step (sampling its first tokens, handing KV over) hold the streams' tokens; and the
KV transfer's throughput beside a plain memory copy (torch `clone`) of
the same bytes. A token's time is when the `step()` call that returned it ended.

Then the KV link alone, for the same token counts: blocks moved between two Ray worker groups (tp=1,
one actor and one torch thread each, no engine steps) through each `kv_transport`, "ray" (export, Ray's
object store, import) and "torch" (torch.distributed point-to-point, gloo here), best of 3.

The model is random and tiny (a few MB) so that 16k-64k-token prompts are affordable on two cores;
the figures show the scheduling, not a real model's speed. Both systems get the same 2 cores: the
colocated engine uses both (2 torch threads); disaggregation gives one to the prefill group and one
to the decode engine, as a cluster gives each pool its own GPUs.
A benchmark prints figures; it asserts nothing about time (DESIGN.md, rule 9). Progress goes to
stderr, so `--json` leaves stdout pure JSON.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from _common import (  # noqa: E402  (this folder is on sys.path: the benchmarks run as scripts)
    Machine, engine_config_dict, finite_or_none, fmt, fmt_load, machine_busy_s, machine_facts, progress, save_random_llama4)
from garrison.planner.simulate import percentile  # noqa: E402  (one definition, shared with the planner)
from garrison_workers.config import from_hf_config  # noqa: E402
from garrison_workers.engine.disagg import DisaggregatedEngine  # noqa: E402
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput  # noqa: E402
from garrison_workers.engine.sequence import SamplingParams  # noqa: E402
from garrison_workers.kv_link import HandleLink, KVLink, TorchChannel  # noqa: E402
from garrison_workers.worker_group import start_local_ray  # noqa: E402
from garrison_workers.parallel.dims import ParallelDims  # noqa: E402

MB = 1e6
FIRST_TOKEN_ID = 3  # 0, 1, 2 are pad, BOS and EOS in tiny_llama4
DTYPE_BYTES = 4  # fp32
MODEL_SEED = 0
PREFILL_DIMS = ParallelDims()  # the prefill worker group: one Ray actor with one torch thread (one core's worth)
DECODE_DIMS = ParallelDims()  # the decode engine, in this process, one torch thread (the other core)
LINK_DIMS = ParallelDims()  # each of the two Ray worker groups between which the KV links alone are timed
RAY_CPUS = 2

# Llama 4's layout (RoPE layers with chunked local attention, NoPE global layers, every layer MoE),
# shrunk: hidden 64, 4 layers (1 and 3 global), 4 experts top-1; a 1024-token local chunk and
# temperature-tuning floor, and a context that holds the longest prompt.
MODEL_OVERRIDES: dict[str, Any] = dict(attention_chunk_size=1024, floor_scale=1024, max_position_embeddings=73_728)


@dataclass(slots=True, frozen=True)
class Workload:
    long_prompt_tokens: tuple[int, ...]  # arriving one after another (closed loop)
    num_streams: int = 8
    stream_prompt_tokens: int = 128
    # Tokens per stream request, in the baseline and under load alike: a stream that finishes is replaced
    # by a new request at once, so both phases decode over the same context lengths (128 to 384 tokens).
    stream_tokens: int = 256
    long_new_tokens: int = 4  # >= 2, so every long prompt's KV is handed over in the disaggregated run
    # Steady-state seconds of the baseline: long enough that its p99 rests on thousands of steps, as under load.
    baseline_s: float = 20.0
    # The streams' first tokens while long prompts arrive are timed over this many starts (the loaded phase's own
    # and the rest alone on the idle engine, spread over the run: `start_groups`): one start's 8 values are one
    # draw of when a few prefill steps came back.
    starts: int = 16
    block_size: int = 16
    max_num_batched_tokens: int = 512
    seed: int = 0

    @property
    def num_kv_blocks(self) -> int:
        """Per engine: two long prompts (one decoding while the next prefills) and every stream at its longest."""
        tokens = 2 * (max(self.long_prompt_tokens) + self.long_new_tokens) + self.num_streams * (
            self.stream_prompt_tokens + self.stream_tokens)
        return -(-tokens // self.block_size) + 64

    def engine_config(self) -> EngineConfig:
        return EngineConfig(block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
                            max_num_batched_tokens=self.max_num_batched_tokens, enable_prefix_caching=False)


FULL = Workload(long_prompt_tokens=(16_384, 24_576, 32_768, 49_152, 65_536))
QUICK = Workload(long_prompt_tokens=(4096, 8192), stream_tokens=64, baseline_s=3.0)


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(length)]


def save_model(directory: Path) -> dict[str, Any]:
    return save_random_llama4(directory, MODEL_SEED, **MODEL_OVERRIDES)


# -- CPU accounting across this process and its children (Ray's daemons and actors) -----------------


def tree_cpu_s() -> float:
    """CPU seconds used by this process and every live descendant (the Ray actors included)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return sum(seconds for pid, seconds in cpu.items() if _descends(pid, os.getpid(), parent))


def _descends(pid: int, root: int, parent: dict[int, int]) -> bool:
    for _ in range(64):
        if pid == root:
            return True
        if pid not in parent or pid <= 1:
            return False
        pid = parent[pid]
    return False


def other_benchmarks() -> list[str]:
    """Other processes running a script under ops/bench/ (a shared machine's other benchmarks)."""
    found = []
    parent: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        parent[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        cmdlines[int(entry.name)] = cmd
    for pid, cmd in cmdlines.items():
        if "ops/bench/" in cmd and "python" in cmd and not _descends(pid, os.getpid(), parent):
            script = next((part for part in cmd.split() if "ops/bench/" in part), cmd)
            found.append(f"{pid} {Path(script).name}")
    return sorted(found)


class CpuWindow:
    """Cores other processes (or the hypervisor) kept busy, on average, between start and stop."""

    def __init__(self) -> None:
        self.busy, self.own, self.start = machine_busy_s(), tree_cpu_s(), time.perf_counter()

    def others_cores(self) -> float:
        seconds = time.perf_counter() - self.start
        others = (machine_busy_s() - self.busy) - (tree_cpu_s() - self.own)
        return max(0.0, others / seconds) if seconds > 0 else 0.0


# -- driving an engine and timing every token -------------------------------------------------------


Engine = LLMEngine | DisaggregatedEngine


@dataclass(slots=True)
class Trace:
    """When each request was added and when each of its tokens came out (the end of its step)."""

    added: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    finished: set[str] = field(default_factory=set)

    def ttft(self, request_id: str) -> float:
        return self.tokens[request_id][0] - self.added[request_id]


class Driver:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.trace = Trace()

    def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self.engine.add_request(request_id, prompt, params)
        self.trace.added[request_id] = time.perf_counter()

    def step(self) -> list[RequestOutput]:
        outputs = self.engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            self.trace.tokens[out.request_id] += [now] * len(out.new_token_ids)
            if out.finished:
                self.trace.finished.add(out.request_id)
        return outputs

    def run_until(self, done: Callable[[], bool], max_steps: int = 1_000_000) -> None:
        for _ in range(max_steps):
            if done():
                return
            if not self.engine.has_unfinished_requests():
                raise RuntimeError("the engine ran out of work before the phase was done")
            self.step()
        raise RuntimeError(f"the phase did not finish within {max_steps} steps")


@dataclass(slots=True)
class Phase:
    """One system, one phase: the streams' TPOT samples and the TTFTs."""

    system: str  # "colocated" or "disaggregated"
    loaded: bool  # long prompts arriving (True) or the baseline (False)
    tpot_s: list[float] = field(default_factory=list)
    stream_ttft_s: list[float] = field(default_factory=list)
    long_ttft_s: dict[int, float] = field(default_factory=dict)  # prompt tokens -> TTFT
    window_s: float = 0.0  # the span the TPOT samples come from
    wall_s: float = 0.0
    steps: int = 0
    others_cores: float = 0.0

    def figures(self) -> dict[str, float]:
        return {"tpot_p50_s": percentile(self.tpot_s, 50), "tpot_p99_s": percentile(self.tpot_s, 99),
                "tpot_max_s": max(self.tpot_s, default=math.nan),
                "stream_ttft_p50_s": percentile(self.stream_ttft_s, 50),
                "stream_ttft_p99_s": percentile(self.stream_ttft_s, 99)}

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "loaded": self.loaded, **self.figures(), "tpot_samples": len(self.tpot_s),
                "stream_ttft_s": self.stream_ttft_s, "long_ttft_s": {str(k): v for k, v in self.long_ttft_s.items()},
                "window_s": self.window_s, "wall_s": self.wall_s, "steps": self.steps,
                "others_cores": self.others_cores}


def gaps(times: list[float], start: float, stop: float) -> list[float]:
    """Gaps between consecutive tokens that both came out within [start, stop]."""
    return [b - a for a, b in itertools.pairwise(times) if a >= start and b <= stop]


def stream_prompts(workload: Workload, vocab_size: int, tag: int) -> list[list[int]]:
    rng = random.Random(workload.seed * 1000 + tag)
    return [random_prompt(rng, workload.stream_prompt_tokens, vocab_size) for _ in range(workload.num_streams)]


def warm_up(engine: Engine, workload: Workload, vocab_size: int) -> None:
    """First-call allocations, every attention path (chunked, blockwise global) and, disaggregated, a handover;
    then, as `garrison serve` after startup, freeze what exists so the collector's full passes skip it."""
    rng = random.Random(99)
    driver = Driver(engine)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for i, length in enumerate((4608, workload.stream_prompt_tokens, workload.stream_prompt_tokens)):
        driver.add(f"warm-{i}", random_prompt(rng, length, vocab_size), params)
    driver.run_until(lambda: not engine.has_unfinished_requests())
    gc.collect()
    gc.freeze()


class Streams:
    """The streams: each a run of `stream_tokens`-token requests, a finished one replaced by the next at once,
    so that new short requests keep arriving (and, disaggregated, keep being prefilled and handed over) in the
    baseline as under load."""

    def __init__(self, driver: Driver, workload: Workload, vocab_size: int, tag: int, prefix: str = "stream") -> None:
        self.driver, self.prompts = driver, stream_prompts(workload, vocab_size, tag)
        self.params = SamplingParams(max_tokens=workload.stream_tokens, ignore_eos=True)
        self.first = [f"{prefix}-{tag}-{i}" for i in range(workload.num_streams)]  # each stream's first request
        self.active = dict(zip(self.first, range(workload.num_streams)))  # request id -> stream index
        self.served: list[str] = list(self.first)
        for request_id, prompt in zip(self.first, self.prompts):
            driver.add(request_id, prompt, self.params)

    def replace_finished(self) -> None:
        for request_id in [r for r in self.active if r in self.driver.trace.finished]:
            index = self.active.pop(request_id)
            follow_up = f"{self.first[index]}-{len(self.served)}"
            self.driver.add(follow_up, self.prompts[index], self.params)
            self.active[follow_up] = index
            self.served.append(follow_up)

    def stop(self) -> None:
        for request_id in self.active:
            self.driver.engine.abort_request(request_id)

    def decoding_from(self) -> float:
        """When every stream had its first token: the steady state starts."""
        return max(self.driver.trace.tokens[r][0] for r in self.first)

    def measure(self, phase: Phase, until: float) -> None:
        """TPOT: gaps within each request (a follow-up's first token is its TTFT, not a TPOT); TTFT of the first
        requests."""
        trace, decoding_from = self.driver.trace, self.decoding_from()
        for request_id in self.served:
            phase.tpot_s += gaps(trace.tokens[request_id], decoding_from, until)
        phase.stream_ttft_s = [trace.ttft(request_id) for request_id in self.first]
        phase.window_s = until - decoding_from


def baseline_phase(system: str, engine: Engine, workload: Workload, vocab_size: int) -> Phase:
    """The streams alone for `workload.baseline_s` of steady state: no long prompt arrives."""
    phase, cpu, start = Phase(system, loaded=False), CpuWindow(), time.perf_counter()
    driver = Driver(engine)
    streams = Streams(driver, workload, vocab_size, tag=1)
    steps = 0
    while not all(driver.trace.tokens.get(r) for r in streams.first) or (
            time.perf_counter() - streams.decoding_from() < workload.baseline_s):
        driver.step()
        steps += 1
        streams.replace_finished()
    streams.stop()
    streams.measure(phase, time.perf_counter())
    phase.wall_s, phase.others_cores, phase.steps = time.perf_counter() - start, cpu.others_cores(), steps
    driver.run_until(lambda: not engine.has_unfinished_requests())  # aborted ones may still be in transit
    return phase


def long_prompts(workload: Workload, vocab_size: int) -> list[tuple[str, list[int]]]:
    """The loaded phase's long prompts, in order of arrival: (request id, tokens)."""
    rng = random.Random(workload.seed * 1000 + 2)
    return [(f"long-{i}", random_prompt(rng, n, vocab_size)) for i, n in enumerate(workload.long_prompt_tokens)]


def start_groups(workload: Workload) -> tuple[range, range, range]:
    """The tags of the loaded phase's start timed alone (`workload.starts - 1` of them), in three groups: before the
    baseline, just before the loaded phase, just after it. Back to back, every start fell within one or two
    seconds of a host whose speed drifts by a fifth within minutes: the streams' TTFT was a snapshot of one
    moment (in one run p50 56 and p99 122 ms, where 72 starts on one engine minutes later, taken in three runs of
    24, came to 46 and 92, with 8 of them drawn at random 43-48 and 85-99 in nine draws of ten)."""
    others = workload.starts - 1
    cuts = [1 + round(others * k / 3) for k in range(4)]
    return range(cuts[0], cuts[1]), range(cuts[1], cuts[2]), range(cuts[2], cuts[3])


def idle_starts(engine: Engine, workload: Workload, long_prompt: list[int], vocab_size: int, tags: range
                ) -> list[float]:
    """The loaded phase's start alone, once per tag: the first long prompt and then the streams arrive at an idle
    engine; stopped (everything aborted and drained) once every stream has its first token. Returns the streams'
    TTFTs."""
    ttfts = []
    for tag in tags:
        driver = Driver(engine)
        long_id = f"start-{tag}-long"
        driver.add(long_id, long_prompt, SamplingParams(max_tokens=workload.long_new_tokens, ignore_eos=True))
        streams = Streams(driver, workload, vocab_size, tag=2, prefix=f"start-{tag}")
        driver.run_until(lambda: all(driver.trace.tokens.get(r) for r in streams.first))
        engine.abort_request(long_id)
        streams.stop()
        driver.run_until(lambda: not engine.has_unfinished_requests())
        ttfts += [driver.trace.ttft(request_id) for request_id in streams.first]
    return ttfts


def both_phases(system: str, engine: Engine, workload: Workload, vocab_size: int,
                before_load: Callable[[], None] = lambda: None) -> tuple[Phase, Phase, list[float]]:
    """The baseline, then the loaded phase (`before_load` called between them), with the loaded phase's start timed
    alone `workload.starts - 1` times around them (`start_groups`): its streams' TTFTs are over every start.

    Returns both phases and the end time of every step of the loaded phase's window (for the step anatomy of the
    disaggregated run)."""
    early, just_before, late = start_groups(workload)
    first_long = long_prompts(workload, vocab_size)[0][1]
    start_ttfts = idle_starts(engine, workload, first_long, vocab_size, early)
    progress(f"{system}: baseline (streams alone)")
    baseline = baseline_phase(system, engine, workload, vocab_size)
    before_load()
    start_ttfts += idle_starts(engine, workload, first_long, vocab_size, just_before)
    progress(f"{system}: long prompts arriving")
    loaded, step_ends = loaded_phase(system, engine, workload, vocab_size)
    loaded.stream_ttft_s += start_ttfts + idle_starts(engine, workload, first_long, vocab_size, late)
    return baseline, loaded, step_ends


def loaded_phase(system: str, engine: Engine, workload: Workload, vocab_size: int) -> tuple[Phase, list[float]]:
    """Long prompts keep arriving; the streams arrive just after the first one and decode meanwhile.

    Returns the phase and the end time of every step (for the step anatomy of the disaggregated run).
    """
    phase, cpu, start = Phase(system, loaded=True), CpuWindow(), time.perf_counter()
    longs = long_prompts(workload, vocab_size)
    long_params = SamplingParams(max_tokens=workload.long_new_tokens, ignore_eos=True)

    driver = Driver(engine)
    trace = driver.trace
    driver.add(*longs[0], long_params)
    streams = Streams(driver, workload, vocab_size, tag=2)
    step_ends, next_long = [], 1
    while not all(request_id in trace.finished for request_id, _ in longs):
        if not engine.has_unfinished_requests():
            raise RuntimeError("the engine ran out of work before the long prompts were done")
        driver.step()
        step_ends.append(time.perf_counter())
        streams.replace_finished()
        if next_long < len(longs) and trace.tokens.get(longs[next_long - 1][0]):  # closed loop: the next arrives
            driver.add(*longs[next_long], long_params)
            next_long += 1
    streams.stop()

    until = max(trace.tokens[r][-1] for r, _ in longs)
    streams.measure(phase, until)
    phase.long_ttft_s = {len(prompt): trace.ttft(request_id) for request_id, prompt in longs}
    phase.wall_s, phase.others_cores = time.perf_counter() - start, cpu.others_cores()
    phase.steps = len(step_ends)
    phase_window = [t for t in step_ends if streams.decoding_from() < t <= until]
    driver.run_until(lambda: not engine.has_unfinished_requests())
    return phase, phase_window


# -- the disaggregated engine, instrumented ---------------------------------------------------------


@dataclass(slots=True)
class Transfer:
    request_id: str
    tokens: int
    seconds: float  # export on the prefill ranks, the link (object store or channel), import on the decode side
    clone_s: float = math.nan  # torch clone of a tensor of the same bytes (allocation included), best of 3
    copy_s: float = math.nan  # copy_ of the same bytes into a tensor already allocated and touched, best of 3
    link_s: dict[str, float] = field(default_factory=dict)  # kv_transport -> the link alone between two groups

    def nbytes(self, kv_bytes_per_token: int) -> int:
        return self.tokens * kv_bytes_per_token


def instrument(engine: DisaggregatedEngine, transfers: list[Transfer], stalls: list[tuple[float, float]]) -> None:
    """Time every handover (from the export's start to the KV in the decode engine's blocks; decode keeps
    stepping meanwhile), and the work of a disaggregated step that keeps the streams' tokens waiting: finishing
    a prefill step, and moving KV handovers on (a slice of import each) or completing them. Instance
    attributes shadow the methods."""
    hand_over, finish_prefill, complete = engine._hand_over, engine._finish_prefill, engine._complete
    finish_handovers = engine._finish_handovers
    started: dict[str, tuple[int, float]] = {}

    def timed_hand_over(self: DisaggregatedEngine, seq: Any) -> list[RequestOutput]:
        started[seq.request_id] = (seq.num_computed_tokens, time.perf_counter())
        return hand_over(seq)

    def timed_complete(self: DisaggregatedEngine, handover: Any) -> list[RequestOutput]:
        outputs = complete(handover)
        tokens, began = started.pop(handover.seq.request_id)
        transfers.append(Transfer(handover.seq.request_id, tokens, time.perf_counter() - began))
        return outputs

    def timed_finish_handovers(self: DisaggregatedEngine, wait: bool = False) -> list[RequestOutput]:
        if not self._handovers:
            return []
        start = time.perf_counter()
        outputs = finish_handovers(wait)
        stalls.append((start, time.perf_counter()))
        return outputs

    def timed_finish_prefill(self: DisaggregatedEngine, step: Any) -> list[RequestOutput]:
        start = time.perf_counter()
        outputs = finish_prefill(step)
        stalls.append((start, time.perf_counter()))
        return outputs

    engine._hand_over = types.MethodType(timed_hand_over, engine)  # type: ignore[method-assign]
    engine._complete = types.MethodType(timed_complete, engine)  # type: ignore[method-assign]
    engine._finish_handovers = types.MethodType(timed_finish_handovers, engine)  # type: ignore[method-assign]
    engine._finish_prefill = types.MethodType(timed_finish_prefill, engine)  # type: ignore[method-assign]


@dataclass(slots=True)
class Anatomy:
    """The disaggregated steps of the loaded window, and the work in them that held tokens back (finishing a
    prefill step, moving KV handovers on: importing a slice, completing one)."""

    steps: int = 0
    busy_steps: int = 0  # steps that did any of that work
    stall_p50_s: float = math.nan  # time such a step spent on it
    stall_max_s: float = math.nan


def anatomy(stalls: list[tuple[float, float]], step_ends: list[float]) -> Anatomy:
    """Each stall belongs to the step whose end is the first at or after its own."""
    held: dict[int, float] = defaultdict(float)
    for start, end in stalls:
        step = bisect.bisect_left(step_ends, end)
        if 0 < step < len(step_ends):  # inside the window
            held[step] += end - start
    spent = list(held.values())
    return Anatomy(len(step_ends), len(spent), percentile(spent, 50), max(spent, default=math.nan))


def copy_seconds(num_bytes: int, repeats: int = 3) -> tuple[float, float]:
    """A plain memory copy of the same bytes, best of `repeats`: (`clone` of an fp32 tensor, allocation
    included; `copy_` into a tensor whose pages are already mapped)."""
    src = torch.ones(max(1, num_bytes // 4), dtype=torch.float32)
    clone_s = copy_s = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        copy = src.clone()
        clone_s = min(clone_s, time.perf_counter() - start)
        del copy
    dst = torch.zeros_like(src)
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        copy_s = min(copy_s, time.perf_counter() - start)
    return clone_s, copy_s


def link_seconds(link: KVLink, tokens: int, block_size: int, repeats: int = 3) -> float:
    """Best of `repeats` transfers of a sequence's first `tokens` tokens; what its blocks hold does not matter."""
    blocks = list(range(-(-tokens // block_size)))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        link.transfer(blocks, blocks, tokens)
        best = min(best, time.perf_counter() - start)
    return best


# -- the run ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    machine: Machine
    workload: Workload
    quick: bool
    threads: int
    engine_config: dict[str, Any]
    model: dict[str, Any]
    kv_transport: str = "ray"  # of the disaggregated system
    kv_bytes_per_token: int = 0
    phases: list[Phase] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    anatomy: Anatomy = field(default_factory=Anatomy)
    colocated_step_p50_s: float = math.nan
    load_s: dict[str, float] = field(default_factory=dict)
    other_benchmarks: dict[str, list[str]] = field(default_factory=dict)  # when checked -> what ran
    wall_s: float = 0.0

    def phase(self, system: str, loaded: bool) -> Phase:
        return next(p for p in self.phases if p.system == system and p.loaded == loaded)

    @property
    def others_cores(self) -> float:
        """Cores other processes used over the measured phases together (each phase weighted by its time).
        Not a whole-run window: Ray's processes exit before the run ends, and their CPU would count as others'."""
        seconds = sum(p.wall_s for p in self.phases)
        return sum(p.others_cores * p.wall_s for p in self.phases) / seconds if seconds else 0.0

    @property
    def quiet(self) -> bool:
        """No other benchmark seen, and under 0.1 cores used by others over the measured phases and in every phase
        longer than a second (a 0.1 s baseline window turns a 10 ms blip into 0.1 cores)."""
        long_phases = [p.others_cores for p in self.phases if p.wall_s > 1.0]
        return (not any(self.other_benchmarks.values()) and self.others_cores < 0.1
                and all(cores < 0.1 for cores in long_phases))


def colocated_run(report: Report, model_dir: Path, vocab_size: int) -> None:
    workload, config = report.workload, report.workload.engine_config()
    torch.set_num_threads(report.threads)
    progress(f"colocated: loading (torch threads: {report.threads})")
    start = time.perf_counter()
    engine = LLMEngine.from_path(model_dir, config)
    report.load_s["colocated"] = time.perf_counter() - start
    warm_up(engine, workload, vocab_size)
    report.other_benchmarks["colocated"] = other_benchmarks()
    baseline, loaded, step_ends = both_phases("colocated", engine, workload, vocab_size)
    report.phases += [baseline, loaded]
    report.colocated_step_p50_s = percentile([b - a for a, b in itertools.pairwise(step_ends)], 50)
    engine.shutdown()


def disaggregated_run(report: Report, model_dir: Path, vocab_size: int) -> None:
    import ray

    workload = report.workload
    config = replace(workload.engine_config(), worker_threads=1, kv_transport=report.kv_transport)
    torch.set_num_threads(1)  # the decode engine, in this process or its rank; the prefill rank gets one thread too
    progress(f"disaggregated: starting Ray ({RAY_CPUS} CPU slots) and loading")
    start = time.perf_counter()
    start_local_ray(RAY_CPUS)
    prefill = LLMEngine.from_path(model_dir, config, PREFILL_DIMS, role="prefill", on_ray=True)
    # A torch channel joins two Ray groups' ranks: the decode engine then runs on a rank of its own.
    decoders = [LLMEngine.from_path(model_dir, config, DECODE_DIMS, role="decode",
                                    on_ray=report.kv_transport == "torch")]
    engine = DisaggregatedEngine(prefill, decoders)
    report.load_s["disaggregated"] = time.perf_counter() - start
    try:
        warm_up(engine, workload, vocab_size)
        report.other_benchmarks["disaggregated"] = other_benchmarks()
        transfers: list[Transfer] = []
        stalls: list[tuple[float, float]] = []
        baseline, loaded, step_ends = both_phases("disaggregated", engine, workload, vocab_size,
                                                  lambda: instrument(engine, transfers, stalls))
        report.phases += [baseline, loaded]
        report.anatomy = anatomy(stalls, step_ends)
    finally:
        for e in (engine.prefill, *engine.decoders):
            e.shutdown()
        ray.shutdown()
    torch.set_num_threads(report.threads)
    progress("memory copy of the same bytes")
    long_ids = {f"long-{i}" for i in range(len(workload.long_prompt_tokens))}
    report.transfers = [t for t in transfers if t.request_id in long_ids]
    for transfer in report.transfers:
        transfer.clone_s, transfer.copy_s = copy_seconds(transfer.nbytes(report.kv_bytes_per_token))


def links_run(report: Report, model_dir: Path) -> None:
    """Each KV transport's link between two Ray worker groups, alone, for each long prompt's token count."""
    import ray

    config = replace(report.workload.engine_config(), worker_threads=1)
    start_local_ray(RAY_CPUS)
    try:
        for transport in ("ray", "torch"):
            progress(f"KV link alone: kv_transport {transport}")
            prefill, decode = (LLMEngine.from_path(model_dir, replace(config, kv_transport=transport), LINK_DIMS,
                                                   role=role, on_ray=True) for role in ("prefill", "decode"))
            try:
                link = (HandleLink(prefill.executor, decode.executor) if transport == "ray"
                        else TorchChannel(prefill.executor, decode.executor, prefill.model_config))
                for transfer in report.transfers:
                    transfer.link_s[transport] = link_seconds(link, transfer.tokens, config.block_size)
            finally:
                prefill.shutdown()
                decode.shutdown()
    finally:
        ray.shutdown()


def run_benchmark(quick: bool, threads: int, kv_transport: str = "ray") -> Report:
    started = time.perf_counter()
    workload = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="garrison-disagg-") as tmp:
        model_dir = Path(tmp)
        progress("building and saving the tiny Llama 4")
        raw = save_model(model_dir)
        report = Report(machine_facts(), workload, quick, threads, engine_config_dict(workload.engine_config()), raw,
                        kv_transport)
        report.machine.torch_threads = threads
        report.other_benchmarks["start"] = other_benchmarks()
        report.kv_bytes_per_token = from_hf_config(raw).kv_bytes_per_token(DTYPE_BYTES)
        vocab_size = raw["vocab_size"]
        colocated_run(report, model_dir, vocab_size)
        gc.collect()
        disaggregated_run(report, model_dir, vocab_size)
        links_run(report, model_dir)
    report.other_benchmarks["end"] = other_benchmarks()
    report.machine.load_average_end = os.getloadavg()
    report.wall_s = time.perf_counter() - started
    return report


# -- output -----------------------------------------------------------------------------------------


def ms(seconds: float, width: int) -> str:
    return fmt(seconds * 1e3, width, 1)


def ratios(report: Report) -> dict[str, float]:
    dis = report.phase("disaggregated", True).figures()["tpot_p99_s"]
    col = report.phase("colocated", True).figures()["tpot_p99_s"]
    dis_base = report.phase("disaggregated", False).figures()["tpot_p99_s"]
    col_base = report.phase("colocated", False).figures()["tpot_p99_s"]
    return {"disaggregated_over_own_baseline": dis / dis_base, "disaggregated_over_colocated_baseline": dis / col_base,
            "colocated_over_own_baseline": col / col_base, "disaggregated_over_colocated": dis / col}


def render(report: Report) -> str:
    return "\n".join([*header_lines(report), "", *tpot_lines(report), "", *ttft_lines(report), "",
                      *ratio_lines(report), "", *anatomy_lines(report), "", *transfer_lines(report), "",
                      *link_lines(report)])


def header_lines(report: Report) -> list[str]:
    m, w, c, r = report.machine, report.workload, report.engine_config, report.model
    mode = "QUICK (smoke test: 4k-8k-token long prompts)" if report.quick else "full"
    seen = sorted({b for found in report.other_benchmarks.values() for b in found})
    others = max((p.others_cores for p in report.phases), default=0.0)
    quiet = ("yes" if report.quiet else "NO") + f": other benchmarks (ops/bench/) seen: {', '.join(seen) or 'none'};" + (
        f" other processes used {report.others_cores:.2f} cores over the measured phases, at most {others:.2f} in one phase")
    return [
        "Garrison disaggregated vs colocated prefill/decode under long prompts: tiny random Llama 4, fp32, CPU",
        f"machine    {m.cpu}; os.cpu_count {m.os_cpu_count}; RAM {m.ram_gib:.1f} GiB",
        f"software   torch {m.torch_version}; transformers {m.transformers_version}; python {m.python_version}",
        f"date       {m.date}; load average start {fmt_load(m.load_average_start)}, end {fmt_load(m.load_average_end)}",
        f"quiet      {quiet}",
        f"mode       {mode}; run wall time {report.wall_s:.0f} s; load colocated {report.load_s['colocated']:.1f} s,"
        f" disaggregated (Ray start + prefill group + decode engine) {report.load_s['disaggregated']:.1f} s",
        f"model      random Llama 4 text: hidden {r['hidden_size']}, {r['num_hidden_layers']} layers (RoPE layers with "
        f"{r['attention_chunk_size']}-token local chunks, every {r['no_rope_layer_interval']}nd layer global NoPE), "
        f"{r['num_local_experts']} experts top-{r['num_experts_per_tok']}, {r['num_attention_heads']} heads / "
        f"{r['num_key_value_heads']} KV heads of {r['head_dim']}; KV {report.kv_bytes_per_token} B/token",
        f"workload   {w.num_streams} streams ({w.stream_prompt_tokens}-token prompts, greedy, EOS ignored) arrive just after"
        f" the first long prompt; long prompts {', '.join(map(str, w.long_prompt_tokens))} tokens arrive one after",
        f"           another (the next as soon as the previous has its first token), {w.long_new_tokens} new tokens each;"
        f" each stream is a run of {w.stream_tokens}-token requests (a finished one is replaced at once; TPOT is"
        f" measured within requests), aborted when the last long prompt is done; random token ids (seed {w.seed})",
        f"baseline   the same {w.num_streams} streams (runs of {w.stream_tokens}-token requests) alone for"
        f" {w.baseline_s:.0f} s of steady state, on the same engine, before the long prompts",
        f"engines    block {c['block_size']}, {c['num_kv_blocks']} KV blocks per engine, max_num_batched_tokens "
        f"{c['max_num_batched_tokens']} (the prefill chunk), prefix cache off",
        f"colocated  one engine in this process; torch threads: {report.threads}",
        *disagg_lines(report.kv_transport),
        "method     a token's time = end of the step() that returned it; TPOT = gaps between consecutive tokens"
        " of a stream's",
        "           request, from when all streams have their first token until the last long prompt is done"
        " (baseline: for its",
        "           steady-state seconds); TTFT = first token - add_request; one warm-up per system, then gc.freeze()"
        " as garrison",
        "           serve does after startup; others = cores other processes kept busy (this process, Ray's daemons"
        " and the actors",
        "           excluded)",
    ]


def disagg_lines(kv_transport: str) -> list[str]:
    if kv_transport == "torch":
        return ["disagg     prefill and decode: a Ray worker group tp=1 each (1 actor, 1 torch thread); KV handed over"
                " through a torch.distributed (gloo) channel,",
                "           received in the background, imported a slice per decode step (paced to ~1/4 of a step);"
                " a prefill step stays in flight across decode steps"]
    return ["disagg     prefill: Ray worker group tp=1 (1 actor, 1 torch thread); decode: one engine in this process"
            " (1 thread); KV handed over through Ray's object store, imported a slice per decode step (paced to ~1/4 of"
            " a step);",
            "           a prefill step stays in flight across decode steps"]


def tpot_lines(report: Report) -> list[str]:
    lines = ["TPOT of the streams (ms)                   p50      p99      max  samples  window s  steps  others"]
    for loaded in (False, True):
        for system in ("colocated", "disaggregated"):
            p = report.phase(system, loaded)
            f = p.figures()
            label = f"{'long prompts arriving' if loaded else 'no long prompts'}, {system}"
            lines.append(f"{label:<40}{ms(f['tpot_p50_s'], 8)}{ms(f['tpot_p99_s'], 9)}{ms(f['tpot_max_s'], 9)}"
                         f"{len(p.tpot_s):>9}{p.window_s:>10.2f}{p.steps:>7}{p.others_cores:>8.2f}")
    return lines


def ttft_lines(report: Report) -> list[str]:
    lengths = report.workload.long_prompt_tokens
    head = "TTFT (s)                                stream p50  stream p99" + "".join(
        f"{f'long {n}':>13}" for n in lengths)
    lines = [head]
    for loaded in (False, True):
        for system in ("colocated", "disaggregated"):
            p = report.phase(system, loaded)
            f = p.figures()
            label = f"{'long prompts arriving' if loaded else 'no long prompts'}, {system}"
            longs = "".join(fmt(p.long_ttft_s.get(n, math.nan), 13, 2) for n in lengths)
            lines.append(f"{label:<40}{fmt(f['stream_ttft_p50_s'], 11, 3)}{fmt(f['stream_ttft_p99_s'], 12, 3)}"
                         + (longs if loaded else ""))
    lines.append("  (while long prompts arrive the streams come in just after the first one and wait for its prefill;")
    starts = report.workload.starts
    lines.append(f"   their TTFT is over {starts} starts: the phase's own and {starts - 1} alone on the idle engine,"
                 " before the baseline, just before the phase and after it, each stopped once every stream has its"
                 " first token)")
    return lines


def ratio_lines(report: Report) -> list[str]:
    r = ratios(report)
    return [
        f"disaggregated p99 TPOT / no-long-prompt p99 TPOT: {r['disaggregated_over_own_baseline']:.2f}x against the"
        f" disaggregated baseline, {r['disaggregated_over_colocated_baseline']:.2f}x against the colocated baseline"
        " (issue 4's target: <= 1.5x)",
        f"colocated p99 TPOT / its no-long-prompt p99 TPOT: {r['colocated_over_own_baseline']:.1f}x;"
        f" disaggregated / colocated p99 TPOT under long prompts: {r['disaggregated_over_colocated']:.2f}x",
    ]


def anatomy_lines(report: Report) -> list[str]:
    a = report.anatomy
    return [
        f"disaggregated steps while long prompts arrive: {a.steps}; {a.busy_steps} of them also finished a"
        f" prefill step or moved KV handovers on (an import slice, a completion), which held the streams' tokens"
        f" {a.stall_p50_s * 1e3:.1f} ms (p50), {a.stall_max_s * 1e3:.1f} ms (max);",
        f"           colocated step while long prompts arrive: {report.colocated_step_p50_s * 1e3:.1f} ms (p50)",
    ]


def transfer_lines(report: Report) -> list[str]:
    link = "a torch channel" if report.kv_transport == "torch" else "Ray object store"
    lines = [f"KV handover of each long prompt (prefill group -> decode engine: export on the ranks, {link},"
             " import a slice per decode step,",
             " paced to ~1/4 of a step; from its start to the KV in place, decode stepping meanwhile; the link's own"
             " speed is in the next table) vs a plain copy of the same bytes",
             f"{'tokens':>8}{'MB':>8}{'transfer ms':>13}{'GB/s':>7}{'clone ms':>10}{'GB/s':>7}{'copy_ ms':>10}{'GB/s':>7}"
             f"{'transfer / clone':>18}{'transfer / copy_':>18}"]
    for t in report.transfers:
        nbytes = t.nbytes(report.kv_bytes_per_token)
        lines.append(f"{t.tokens:>8}{nbytes / MB:>8.1f}{ms(t.seconds, 13)}{fmt(nbytes / t.seconds / 1e9, 7, 2)}"
                     f"{fmt(t.clone_s * 1e3, 10, 2)}{fmt(nbytes / t.clone_s / 1e9, 7, 2)}"
                     f"{fmt(t.copy_s * 1e3, 10, 2)}{fmt(nbytes / t.copy_s / 1e9, 7, 2)}"
                     f"{fmt(t.seconds / t.clone_s, 18, 1, 'x')}{fmt(t.seconds / t.copy_s, 18, 1, 'x')}")
    lines.append("  (GB/s = KV bytes / time, each byte counted once; best of 3; clone = torch clone of an fp32 tensor of"
                 " the same size,")
    lines.append("   allocation and page faults included; copy_ = into a tensor already allocated and touched)")
    return lines


def link_lines(report: Report) -> list[str]:
    lines = ["KV link alone between two Ray worker groups (tp=1 each, no engine steps), by kv_transport, vs copy_",
             f"{'tokens':>8}{'MB':>8}{'ray ms':>10}{'GB/s':>7}{'torch ms':>10}{'GB/s':>7}{'copy_ ms':>10}{'GB/s':>7}"
             f"{'ray / copy_':>13}{'torch / copy_':>15}"]
    for t in report.transfers:
        nbytes = t.nbytes(report.kv_bytes_per_token)
        ray_s, torch_s = t.link_s.get("ray", math.nan), t.link_s.get("torch", math.nan)
        lines.append(f"{t.tokens:>8}{nbytes / MB:>8.1f}{ms(ray_s, 10)}{fmt(nbytes / ray_s / 1e9, 7, 2)}"
                     f"{ms(torch_s, 10)}{fmt(nbytes / torch_s / 1e9, 7, 2)}"
                     f"{fmt(t.copy_s * 1e3, 10, 2)}{fmt(nbytes / t.copy_s / 1e9, 7, 2)}"
                     f"{fmt(ray_s / t.copy_s, 13, 1, 'x')}{fmt(torch_s / t.copy_s, 15, 1, 'x')}")
    lines.append("  (ray = export on the prefill rank, Ray object store, import on the decode rank; torch = the same"
                 " export and")
    lines.append("   import around torch.distributed point-to-point sends over a gloo channel; both one actor per"
                 " group, best of 3)")
    return lines


def to_json(report: Report) -> str:
    body = {
        "machine": asdict(report.machine), "workload": asdict(report.workload), "quick": report.quick,
        "kv_transport": report.kv_transport,
        "threads": report.threads, "engine_config": report.engine_config, "model": report.model,
        "kv_bytes_per_token": report.kv_bytes_per_token, "load_s": report.load_s, "wall_s": report.wall_s,
        "quiet": report.quiet, "other_benchmarks": report.other_benchmarks, "others_cores": report.others_cores,
        "phases": [p.to_dict() for p in report.phases], "ratios": ratios(report),
        "anatomy": asdict(report.anatomy), "colocated_step_p50_s": report.colocated_step_p50_s,
        "transfers": [{**asdict(t), "bytes": t.nbytes(report.kv_bytes_per_token),
                       "gb_s": t.nbytes(report.kv_bytes_per_token) / t.seconds / 1e9,
                       "clone_gb_s": t.nbytes(report.kv_bytes_per_token) / t.clone_s / 1e9,
                       "copy_gb_s": t.nbytes(report.kv_bytes_per_token) / t.copy_s / 1e9,
                       "link_gb_s": {transport: t.nbytes(report.kv_bytes_per_token) / seconds / 1e9
                                     for transport, seconds in t.link_s.items()}}
                      for t in report.transfers],
    }
    return json.dumps(finite_or_none(body), indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4k-8k-token long prompts: a smoke test of the script")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the colocated engine (default: one per core)")
    parser.add_argument("--kv-transport", choices=("ray", "torch"), default="ray",
                        help="how the disaggregated system moves KV: Ray's object store to a decode engine in this "
                             "process (default), or a torch.distributed channel between two Ray worker groups")
    args = parser.parse_args()
    report = run_benchmark(args.quick, max(1, args.threads), args.kv_transport)
    print(to_json(report) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
