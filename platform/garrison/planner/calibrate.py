"""`garrison plan calibrate`: measure this machine with the real engine and write a hardware profile.

What it measures, with `threads` torch threads per rank (one rank is one "GPU" of the profile):
1. peak GEMM FLOPS (fp32 matmuls), the share of it GEMMs of 1 to 256 rows reach with their weights read from
   memory, and memory read bandwidth (a reduction over a large tensor);
2. engine steps of random models built in memory (a dense Llama, a Llama 4 MoE with chunked and global layers,
   and optionally a real model such as SmolLM2): decode batches, prefill chunks at growing contexts. The
   efficiencies and overheads of the time model are fitted to these steps (non-negative least squares);
3. gloo all-to-alls between 2 and 4 processes (bandwidth) and, with Ray, the engine's own EP steps of a MoE at
   ep=2 and ep=4 (Ray worker groups): what a collective costs inside a step, beyond the fitted compute;
4. a Ray actor call's round trip (a worker group's step) and a tensor through Ray's object store (the KV
   handoff), when Ray is installed.

The profile is written as YAML with every measurement beside the fitted values.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from garrison_workers.config import ModelConfig, from_hf_config, tiny_llama4
from garrison_workers.engine.config import EngineConfig
from garrison_workers.engine.disagg import DisaggregatedEngine
from garrison_workers.engine.executor import LocalExecutor
from garrison_workers.engine.llm_engine import LLMEngine
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.fusion import fuse_projections
from garrison_workers.kv_transfer import KVPayload, RayObjectStoreTransport
from garrison_workers.loader import ModelLocation
from garrison_workers.model import CausalLM
from garrison_workers.parallel.dims import ParallelDims
from garrison_workers.worker_group import start_local_ray

from garrison.planner.hardware import Efficiency, Hardware, Link, save_profile
from garrison.planner.layout import Group
from garrison.planner.memory import Precision
from garrison.planner.models import model_key
from garrison.planner.step_time import Row, StepCost, StepTimeModel, step_kind

Progress = Callable[[str], None]
LONG_DECODE = 768  # prompt tokens of the long-context decode points: within the default key block (1024)
# The fitted coefficients, in the order of `features`.
COEFFICIENTS = ("inv_gemm", "inv_gemm_small", "inv_memory", "inv_attention", "attention_pair_s", "decode_pair_s",
                "blockwise_pair_s", "spill_pair_s", "key_block_s", "layer_overhead_s", "row_overhead_s",
                "segment_overhead_s", "expert_overhead_s", "step_overhead_s")


@dataclass(slots=True)
class Point:
    """One measured engine step: what it computed, and how long it took (the fastest of its repeats)."""

    label: str
    model: ModelConfig
    rows: list[Row]
    seconds: float
    key_block: int = 1024  # the engine's attention key block when it was measured
    cost: StepCost | None = None
    times: list[float] = field(default_factory=list)  # every repeat, the fastest (`seconds`) among them


# -- models built in memory -------------------------------------------------------------------------


def dense_llama(hidden: int, layers: int, intermediate: int, vocab: int = 8192) -> ModelConfig:
    head_dim = 32 if hidden < 256 else 64
    return from_hf_config(dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                               num_hidden_layers=layers, num_attention_heads=hidden // head_dim, num_key_value_heads=2,
                               head_dim=head_dim, max_position_embeddings=65536, eos_token_id=2))


def moe_llama4_raw(hidden: int, experts: int, chunk: int, global_every: int = 2) -> dict[str, Any]:
    """A Llama 4 MoE's config as a checkpoint's config.json holds it."""
    head_dim = 16 if hidden < 256 else 32
    return tiny_llama4(
        vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden, intermediate_size_mlp=4 * hidden,
        num_hidden_layers=4, num_attention_heads=hidden // head_dim, num_key_value_heads=2, head_dim=head_dim,
        num_local_experts=experts, no_rope_layer_interval=global_every, attention_chunk_size=chunk,
        floor_scale=chunk, max_position_embeddings=65536)


def moe_llama4(hidden: int, experts: int, chunk: int, global_every: int = 2) -> ModelConfig:
    return from_hf_config(moe_llama4_raw(hidden, experts, chunk, global_every))


def random_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> CausalLM:
    """The real model over random weights, as a checkpoint would fill it (projections not yet stacked)."""
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def save_random_checkpoint(raw: dict[str, Any], directory: Path) -> None:
    """A model of random weights as a checkpoint (config.json, model.safetensors) for ranks that load from files
    (Ray worker groups): the model's parameter names are the checkpoint's."""
    from safetensors.torch import save_file

    model = random_model(from_hf_config(raw))
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(raw))


def random_engine(config: ModelConfig, engine_config: EngineConfig) -> LLMEngine:
    """An engine over random weights (no checkpoint): the real model, runner and scheduler, with its projections
    stacked as the loader stacks them (the steps must be those a loaded model takes)."""
    model = random_model(config, engine_config.dtype)
    fuse_projections(model)
    num_blocks = engine_config.num_kv_blocks or 1
    return LLMEngine(LocalExecutor(model.eval(), num_blocks, engine_config), config, None, engine_config, num_blocks)


# -- measuring engine steps ---------------------------------------------------------------------------


def _timed_calls(call: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def decode_point(engine: LLMEngine, config: ModelConfig, batch: int, prompt: int, steps: int) -> Point:
    """`batch` sequences past their prompts, each step one token each. The fastest of `steps` steps: on a shared
    machine other processes only ever slow a step down, so the minimum is the machine's own speed."""
    params = SamplingParams(max_tokens=steps + 64, ignore_eos=True)
    for i in range(batch):
        prompt_ids = [3 + (i * 7 + j) % 50 for j in range(prompt)]
        engine.add_request(f"d{batch}-{prompt}-{i}-{time.monotonic_ns()}", prompt_ids, params)
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running
              ) or engine.scheduler.waiting:
        engine.step()
    times = _timed_calls(engine.step, steps)
    if len(engine.scheduler.running) != batch or engine.scheduler.waiting:
        # Too few KV blocks: the step ran fewer sequences than the point would claim (preempted or waiting).
        raise RuntimeError(f"calibration: a decode batch of {batch} ran {len(engine.scheduler.running)} sequences: "
                           f"the engine's {engine.block_manager.num_blocks} KV blocks do not hold {batch} of "
                           f"{prompt + steps} tokens")
    for seq in list(engine.scheduler.running):
        engine.abort_request(seq.request_id)
    context = prompt + 1 + steps // 2
    return Point(f"{_name(config)} decode batch {batch} context {prompt}", config, [Row(1, context)] * batch,
                 min(times), engine.config.attention_key_block, times=times)


def prefill_points(engine: LLMEngine, config: ModelConfig, prompt: int, chunk: int, repeats: int = 2) -> list[Point]:
    """One prompt prefilled `chunk` tokens per step (the engine's token budget): a point per step at its context,
    the fastest of `repeats` runs of the same prompt."""
    runs: dict[int, list[float]] = {}
    for run in range(repeats):
        engine.add_request(f"p{prompt}-{chunk}-{run}-{time.monotonic_ns()}", [3 + j % 50 for j in range(prompt)],
                           SamplingParams(max_tokens=1))
        context = 0
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            runs.setdefault(context, []).append(time.perf_counter() - start)
            context += min(chunk, prompt - context)
    return [Point(f"{_name(config)} prefill {min(chunk, prompt - c)} at {c}", config, [Row(min(chunk, prompt - c), c)],
                  min(times), engine.config.attention_key_block, times=times) for c, times in sorted(runs.items())]


def batched_prefill_point(engine: LLMEngine, config: ModelConfig, prompts: int, length: int, repeats: int = 3
                          ) -> Point:
    """`prompts` prompts of `length` tokens prefilled in one step (each its own prefill segment), the fastest of
    `repeats` runs."""
    if prompts * length > engine.config.max_num_batched_tokens:
        raise ValueError(f"{prompts} prompts of {length} tokens exceed the step's token budget")
    times = []
    for run in range(repeats):
        for i in range(prompts):
            engine.add_request(f"b{prompts}-{length}-{run}-{i}-{time.monotonic_ns()}",
                               [3 + (i * 11 + j) % 50 for j in range(length)], SamplingParams(max_tokens=1))
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        while engine.has_unfinished_requests():
            engine.step()
    return Point(f"{_name(config)} prefill {prompts} prompts of {length}", config, [Row(length, 0)] * prompts,
                 min(times), engine.config.attention_key_block, times=times)


def _name(config: ModelConfig) -> str:
    kind = f"moe{config.num_experts}" if config.moe_layers else "dense"
    return f"{kind} h{config.hidden_size} L{config.num_layers}"



def engine_points(threads: int, quick: bool, progress: Progress, extra: list[Point] | None = None) -> list[Point]:
    """Steps of built-in models: tiny ones (framework overheads per step, layer, sequence and expert), wider ones
    (GEMM and memory efficiency), and prompts prefilled to a few thousand tokens (attention)."""
    torch.set_num_threads(threads)
    steps = 4 if quick else 8
    longest = 3072 if quick else 6144
    # (model, decode batches, prompt to prefill, prefill chunk, attention key block); the last two models are
    # attention probes: long prompts with small and with large score tiles (query rows × key block)
    plans: list[tuple[ModelConfig, tuple[int, ...], int, int, int]] = [
        (dense_llama(64, 2, 128, vocab=512), (1, 8, 32), 0, 512, 1024),
        (dense_llama(64, 8, 128, vocab=512), (1, 8, 32), 0, 512, 1024),
        (moe_llama4(*REPLICA_MODEL), (1, 8, 32), 0, 512, 1024),
        (dense_llama(256, 4, 1024), (1, 8), longest, 512, 1024),
        (moe_llama4(256, 8, 512), (1, 8), longest, 512, 1024),
        (dense_llama(1024, 4, 4096), (1, 8), 1024, 512, 1024),
        (dense_llama(128, 2, 128, vocab=512), (), 2 * longest, 512, 1024),
        (moe_llama4(128, 4, 8192, global_every=4), (), longest + 2048, 2048, 4096),
    ]
    points: list[Point] = []
    for config, batches, prompt, chunk, key_block in plans:
        engine = random_engine(config, steps_engine_config(batches, prompt, chunk, key_block, steps))
        progress(f"  calibrating on {_name(config)}")
        points += engine_steps(engine, config, batches, prompt, steps)
    return points + list(extra or [])


def steps_engine_config(batches: tuple[int, ...], prompt: int, chunk: int, key_block: int, steps: int
                        ) -> EngineConfig:
    """An engine with KV blocks for `engine_steps`' decode batches and prompt, `chunk` tokens per step."""
    decode_tokens = max(max(batches, default=0) * (128 + steps + 16), 8 * (LONG_DECODE + steps + 16))
    return EngineConfig(num_kv_blocks=-(-(max(prompt, 200, decode_tokens) + 64) // 16) + 64,
                        enable_prefix_caching=False, max_num_batched_tokens=chunk, attention_key_block=key_block)


def engine_steps(engine: LLMEngine, config: ModelConfig, batches: tuple[int, ...], prompt: int, steps: int
                 ) -> list[Point]:
    """Each decode batch at a 128-token context and a batch of 8 over longer ones (a decode row's keys cost what
    the decode kernel makes them cost: only contexts that differ tell it), 1, 4 and 8 prompts in one step, and a
    prompt prefilled in the engine's chunks."""
    chunk, key_block = engine.config.max_num_batched_tokens, engine.config.attention_key_block
    engine.generate([[3, 4, 5, 6] * 32], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    points = [decode_point(engine, config, batch, 128, steps) for batch in batches]
    if batches:
        points.append(decode_point(engine, config, 8, LONG_DECODE, steps))
        # several prompts in one step: what a prefill segment costs beyond its tokens
        points += [batched_prefill_point(engine, config, n, chunk // 8) for n in (1, 4, 8)]
    if prompt:
        points += prefill_points(engine, config, prompt, chunk)
    if prompt > key_block and not batches:
        # one sequence decoding past that prompt: a single query over many key blocks, where a block's fixed
        # operations outweigh its pairs (a prefill chunk's do not tell them apart)
        points.append(decode_point(engine, config, 1, prompt, steps))
    return points


def model_points(location: ModelLocation, threads: int, quick: bool, progress: Progress) -> list[Point]:
    """A model's own steps (`garrison plan calibrate --model`), as `engine_steps` times a built-in model's:
    decode batches of 1 and 8, prompts prefilled together and one prefilled in 512-token chunks. Calibration keeps
    them beside the fit (`Efficiency.own_steps`), and plans for this model price its steps from them."""
    torch.set_num_threads(threads)
    steps, prompt = (4, 1024) if quick else (8, 2048)
    engine = LLMEngine.from_path(location, replace(steps_engine_config((1, 8), prompt, 512, 1024, steps),
                                                   worker_threads=threads))
    config = engine.model_config
    progress(f"  {model_key(config)}: its own steps")
    try:
        return engine_steps(engine, config, (1, 8), prompt, steps)
    finally:
        engine.shutdown()


# -- steps inside a disaggregated replica ----------------------------------------------------------


REPLICA_MODEL = (64, 16, 512)  # the disaggregated replica's: a tiny MoE of `engine_points`, whose steps the fit has
# The replica is timed over this many windows and the calmest kept (the lowest median decode step): a spell of
# load in one window (here once a median 6.74 ms, against 5.0-5.8 in five other runs) is not the replica's own
# spread, and load only ever slows steps down, as `decode_point` keeps the fastest step.
REPLICA_WINDOWS = 2


@dataclass(slots=True)
class PrefillStep:
    """A prefill group's step inside a disaggregated replica, as its ranks ran it."""

    rows: list[Row]
    exports: int  # KV exports sent to the group just before it: its ranks run calls in order, these first
    seconds: float  # from the call sent to every rank's result ready


def replica_points(threads: int, quick: bool, progress: Progress) -> tuple[list[Point], list[PrefillStep]]:
    """A decode batch of 8 timed alone, then inside a disaggregated replica on this host: the same model's decode group
    (in this process) stepping 8 streams whose requests keep ending and arriving (so their prompts keep being
    prefilled and handed over) while its prefill group (a Ray rank) prefills 4k-token prompts one after another. The
    point's `seconds` is the fastest alone and `times` the replica's steps of 8, from the calmest of
    `REPLICA_WINDOWS` windows (its prefill steps with them). With every core taken, what else the host runs (Ray's
    threads in both processes, the kernel's workers freeing the object store's pages) preempts a rank where an idle
    core had absorbed it: steps a few milliseconds long show it in their tail (here a p99 9 ms over the fastest,
    where alone the slowest was 3 ms over). The prefill group's steps are timed too (`replica_prefill_excess` prices
    them): the streams' first tokens wait on them, and there a step priced 15-19 ms came back after 19-38 ms. Empty
    without Ray or without two rank slots."""
    if (os.cpu_count() or 1) // threads < 2:
        return [], []
    torch.set_num_threads(threads)
    raw = moe_llama4_raw(*REPLICA_MODEL)
    config = EngineConfig(num_kv_blocks=1200, max_num_batched_tokens=512, enable_prefix_caching=False,
                          worker_threads=threads)
    windows: list[tuple[list[float], list[PrefillStep]]] = []  # each window's decode steps and prefill steps
    prefill_steps: list[PrefillStep] = []
    with tempfile.TemporaryDirectory(prefix="garrison-replica-") as tmp:
        save_random_checkpoint(raw, Path(tmp))
        alone_engine = LLMEngine.from_path(tmp, config)
        alone_engine.generate([[3, 4, 5, 6] * 32], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        alone = decode_point(alone_engine, alone_engine.model_config, 8, 128, 16 if quick else 48)
        alone_engine.shutdown()
        with _ray_slots(2, progress, "the replica's decode steps") as usable:
            engines: list[LLMEngine] = []
            try:
                if usable:
                    engines = [LLMEngine.from_path(tmp, config, ParallelDims(), role="prefill", on_ray=True),
                               LLMEngine.from_path(tmp, config, ParallelDims(), role="decode", on_ray=False)]
                    replica = DisaggregatedEngine(engines[0], [engines[1]])
                    settle = _time_prefill_steps(engines[0].executor, prefill_steps)
                    for window in range(REPLICA_WINDOWS):
                        first = len(prefill_steps)
                        decode_s = _replica_decode_steps(replica, 3.0 if quick else 8.0, window)
                        settle()  # the window's last steps are recorded before the next window's start
                        if decode_s:
                            windows.append((decode_s, prefill_steps[first:]))
            finally:
                for engine in engines:
                    engine.shutdown()
    if not windows:
        return [], []
    times, kept = min(windows, key=lambda w: statistics.median(w[0]))
    point = replace(alone, label=f"{alone.label} in a disaggregated replica", times=times)
    medians = ", ".join(f"{statistics.median(w[0]) * 1e3:.2f}" for w in windows)
    progress(f"  {point.label}: median {statistics.median(times) * 1e3:.2f} ms (the calmest of windows of {medians}),"
             f" slowest {max(times) * 1e3:.2f} against {statistics.median(alone.times) * 1e3:.2f} and "
             f"{max(alone.times) * 1e3:.2f} alone; {len(kept)} prefill steps timed")
    return [point], kept


def _time_prefill_steps(group: Any, steps: list[PrefillStep]) -> Callable[[], None]:
    """Time each step of a prefill worker group on Ray from the call sent to its ranks' results ready (a thread
    waits on the step's refs: the replica's loop only looks once per decode step), and count the KV exports sent
    before it. Instance attributes shadow the group's methods. Returns what waits for the steps sent so far to be
    recorded."""
    import ray

    submit, start_export = group.submit, group.start_export_kv
    exports = [0]
    waiting: list[threading.Thread] = []

    def timed_submit(chunks: list[Any]) -> Any:
        sent = time.perf_counter()
        pending = submit(chunks)
        rows = [Row(len(chunk.token_ids), chunk.start, chunk.draw is not None) for chunk in chunks]
        before, exports[0] = exports[0], 0

        def wait() -> None:
            try:
                ready, _ = ray.wait(pending.refs, num_returns=len(pending.refs), timeout=60)
            except Exception:  # Ray shut down under a step: nothing to time  # noqa: BLE001
                return
            if len(ready) == len(pending.refs):
                steps.append(PrefillStep(rows, before, time.perf_counter() - sent))

        waiting.append(threading.Thread(target=wait, daemon=True))
        waiting[-1].start()
        return pending

    def counted_export(*args: Any) -> Any:
        exports[0] += 1
        return start_export(*args)

    def settle() -> None:
        while waiting:
            waiting.pop().join()

    group.submit, group.start_export_kv = timed_submit, counted_export
    return settle


def replica_prefill_excess(steps: list[PrefillStep], model: ModelConfig, hardware: Hardware) -> list[list[float]]:
    """Per prefill step timed inside the replica (`step_excess`'s form): its price (the step on a prefill group
    on Ray, and the exports its ranks ran first) and what it took over that."""
    step_model = StepTimeModel(model, hardware, Precision("fp32", "fp32"), Group("prefill", 1, 1), on_ray=True)
    priced = [step_model.seconds(step.rows) + step.exports * hardware.efficiency.kv_export_s for step in steps]
    return [[price, max(0.0, step.seconds - price)] for step, price in zip(steps, priced) if step.rows]


def _replica_decode_steps(engine: DisaggregatedEngine, seconds: float, window: int = 0, streams: int = 8
                          ) -> list[float]:
    """Run the replica for `seconds`; the seconds of each decode step that ran all `streams` rows. `window` keeps
    each window's request ids apart."""
    times: list[float] = []

    def observe(rows: int, step_s: float) -> None:
        if rows == streams:
            times.append(step_s)

    engine.decode_step_observer = observe
    stream, long = SamplingParams(max_tokens=48, ignore_eos=True), SamplingParams(max_tokens=2, ignore_eos=True)
    arrived = itertools.count()

    def add(kind: str, length: int, params: SamplingParams) -> None:
        n = next(arrived)
        engine.add_request(f"{kind}-{window}-{n}", [3 + (n * 7 + j) % 50 for j in range(length)], params)

    for _ in range(streams):
        add("stream", 128, stream)
    add("long", 4096, long)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for out in engine.step():
            if out.finished:  # the next request of that stream, or the next long prompt, arrives at once
                add(*(("stream", 128, stream) if out.request_id.startswith("stream") else ("long", 4096, long)))
    for n in range(next(arrived)):
        for kind in ("stream", "long"):
            engine.abort_request(f"{kind}-{window}-{n}")
    while engine.has_unfinished_requests():
        engine.step()
    return times


# -- fitting ----------------------------------------------------------------------------------------


def features(cost: StepCost) -> list[float]:
    attention_flops_s = sum(f for f, _, kind in cost.ops if kind == "attention")
    return [cost.gemm_flops_s, cost.small_gemm_flops_s, cost.stream_bytes_s, attention_flops_s, cost.attention_pairs,
            cost.decode_pairs, cost.blockwise_pairs, cost.spill_pairs, cost.key_blocks, float(cost.layers),
            float(cost.rows), float(cost.segments), cost.experts, 1.0]


def nnls(rows: list[list[float]], targets: list[float], weights: list[float]) -> list[float]:
    """Weighted least squares with every coefficient >= 0 (Lawson and Hanson's active-set method: a coefficient
    joins the free set while the residual wants it to grow; a step that would take one below zero stops at zero
    and frees it again). Dropping every negative coefficient of an unconstrained fit at once, as a shortcut, can
    land far from the optimum: it did on this machine's steps (a median error of 23% against 14%)."""
    w = torch.tensor(weights, dtype=torch.float64)
    a = torch.tensor(rows, dtype=torch.float64) * w[:, None]
    b = torch.tensor(targets, dtype=torch.float64) * w
    scale = a.abs().max(dim=0).values.clamp_min(1e-30)
    a = a / scale
    n = a.shape[1]
    free: list[int] = []
    x = torch.zeros(n, dtype=torch.float64)
    tolerance = 1e-12 * float(a.abs().sum() * b.abs().sum() + 1)
    for _ in range(10 * n):
        gradient = a.T @ (b - a @ x)
        wanted = [j for j in range(n) if j not in free and gradient[j] > tolerance]
        if not wanted:
            break
        free.append(max(wanted, key=lambda j: float(gradient[j])))
        while True:
            z = torch.zeros(n, dtype=torch.float64)
            z[free] = torch.linalg.lstsq(a[:, free], b[:, None]).solution.flatten()
            if all(z[j] > 0 for j in free):
                x = z
                break
            step = min(float(x[j] / (x[j] - z[j])) for j in free if z[j] <= 0)
            x = x + step * (z - x)
            free = [j for j in free if x[j] > 1e-15]
            x[[j for j in range(n) if j not in free]] = 0.0
    return (x / scale).tolist()


def fit(points: list[Point], base: Hardware) -> tuple[Efficiency, list[dict[str, Any]]]:
    """Efficiencies and overheads that best explain the measured steps (relative error weighted)."""
    for point in points:
        point.cost = StepTimeModel(point.model, base, Precision("fp32", "fp32"), Group("both", 1, 1),
                                   on_ray=False, key_block=point.key_block).cost(point.rows)
    matrix = [features(p.cost) for p in points if p.cost is not None]
    # Nothing runs faster than the measured peak and bandwidth: an inverse efficiency is at least 1, and with a
    # measured GEMM curve (bare GEMMs over weights in DRAM; the engine's, on weights in cache, may run faster)
    # its scale may lift no row count above the peak. Fitted as that floor plus a non-negative excess, the fit
    # answers under the bounds the profile holds, rather than leaning on a term the profile cannot price so.
    curve = base.efficiency.gemm_curve
    floor = {"inv_gemm": max(curve.values()) if curve else 1.0, "inv_gemm_small": 1.0, "inv_memory": 1.0,
             "inv_attention": 1.0}
    floors = [floor.get(name, 0.0) for name in COEFFICIENTS]
    excess = [p.seconds - sum(f * x for f, x in zip(row, floors)) for p, row in zip(points, matrix)]
    coefficients = nnls(matrix, excess, [1 / p.seconds for p in points])
    c = {name: low + x for name, low, x in zip(COEFFICIENTS, floors, coefficients)}
    if curve:  # the engine's GEMMs against the bare ones: that scale goes into the curve
        curve = {rows: share / c["inv_gemm"] for rows, share in curve.items()}
        c["inv_gemm"] = 1.0
    # The fit prices a step's fastest run; the others ran longer, by what the interpreter, the allocator, other
    # processes and the hypervisor added: kept per point, for the simulation to draw from (`step_excess`).
    repeated = [p for p in points if len(p.times) > 1]
    jitter = [t - p.seconds for p in repeated for t in p.times]
    eff = Efficiency(gemm=_share(c["inv_gemm"]), gemm_small=_share(c["inv_gemm_small"]), gemm_curve=curve,
                     memory=_share(c["inv_memory"]), attention=_share(c["inv_attention"]),
                     attention_pair_s=c["attention_pair_s"], decode_pair_s=c["decode_pair_s"],
                     blockwise_pair_s=c["blockwise_pair_s"], spill_pair_s=c["spill_pair_s"],
                     key_block_s=c["key_block_s"], overlap="sum",
                     step_overhead_s=c["step_overhead_s"], layer_overhead_s=c["layer_overhead_s"],
                     row_overhead_s=c["row_overhead_s"], segment_overhead_s=c["segment_overhead_s"],
                     expert_overhead_s=c["expert_overhead_s"],
                     step_jitter_s=max(0.0, statistics.median(jitter)) if jitter else 0.0,
                     step_excess=step_excess(repeated),
                     calibrated=True)
    fitted = replace(base, efficiency=eff)
    report = []
    for point in points:
        predicted = StepTimeModel(point.model, fitted, Precision("fp32", "fp32"), Group("both", 1, 1),
                                  on_ray=False, key_block=point.key_block).seconds(point.rows)
        report.append({"point": point.label, "measured_s": point.seconds, "fitted_s": predicted})
    return eff, report


def own_steps(points: list[Point], fitted: Hardware) -> dict[str, dict[str, list[list[float]]]]:
    """Per model of `points` (`model_key`) and kind of step: [fitted, measured] seconds of each of its steps."""
    table: dict[str, dict[str, list[list[float]]]] = {}
    for point in points:
        model = StepTimeModel(point.model, fitted, Precision("fp32", "fp32"), Group("both", 1, 1), on_ray=False,
                              key_block=point.key_block)
        kind = step_kind(model.cost(point.rows))
        table.setdefault(model.key, {}).setdefault(kind, []).append([model.seconds(point.rows), point.seconds])
    return table


def step_excess(points: list[Point]) -> list[list[float]]:
    """Per point: its fastest step, then what each of its repeats took over that."""
    return [[p.seconds, *(max(0.0, t - p.seconds) for t in p.times)] for p in points if len(p.times) > 1]


def _share(inverse: float) -> float:
    """An efficiency from its fitted inverse (at least 1)."""
    return 1.0 / max(1.0, inverse)


# -- machine primitives -----------------------------------------------------------------------------


def gemm_peak_flops(threads: int, quick: bool) -> float:
    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in ((256, 1024, 1024), (512, 2048, 2048), (1024, 1024, 4096)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        repeats = 3 if quick else 8
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - start))
    return best


CURVE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def gemm_curve(threads: int, peak: float, quick: bool) -> dict[int, float]:
    """Share of `peak` an fp32 GEMM reaches at each row count, its weights (1024 x 2048, a pool of 512 MB: past
    any cache) read from memory as a model's are in a step; the best of a few passes over the pool."""
    torch.set_num_threads(threads)
    k, n = 1024, 2048
    pool = [torch.randn(k, n) for _ in range((512 << 20) // (k * n * 4))]
    curve = {}
    for rows in CURVE_ROWS:
        x = torch.randn(rows, k)
        best = math.inf
        for _ in range(2 if quick else 3):
            start = time.perf_counter()
            for weight in pool:
                x @ weight
            best = min(best, time.perf_counter() - start)
        curve[rows] = 2 * rows * k * n * len(pool) / best / peak
    return curve


def read_bandwidth(threads: int) -> float:
    torch.set_num_threads(threads)
    data = torch.ones(64 << 20)  # 256 MB: past any cache
    data.sum()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def _collective_worker(rank: int, world: int, port: int, results: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    timings = {}
    for name, nbytes in (("small", 1024), ("large", 4 << 20)):
        x = torch.ones(max(world, nbytes // 4))
        x = x[: x.numel() // world * world]
        out = torch.empty_like(x)
        for _ in range(3):
            dist.all_to_all_single(out, x)
        dist.barrier()
        # Each call timed alone; the mean of all but the slowest tenth. A plain mean let one rank descheduled once
        # (Ray's processes of the section before exiting) price every collective at several milliseconds; a median
        # flips between the two modes of more ranks than cores (a call either finds every rank running, ~0.3 ms,
        # or waits out a scheduler slice, ~4 ms), where the mean is what steps see.
        times = sorted(_timed_calls(partial(dist.all_to_all_single, out, x), 60 if name == "small" else 10))
        kept = times[:len(times) - len(times) // 10]
        timings[name] = (statistics.fmean(kept), x.numel() * 4)
    if rank == 0:
        results.put(timings)
    dist.destroy_process_group()


def collectives(world: int) -> dict[str, tuple[float, int]]:
    """Seconds of one gloo all_to_all_single with 1 KB and 4 MB per rank, between `world` processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_collective_worker, args=(r, world, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    timings = results.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return timings


def gloo_link(progress: Progress) -> tuple[Link, dict[str, Any]]:
    measured = {}
    for world in (2, 4):
        progress(f"  gloo all-to-all between {world} processes")
        measured[world] = collectives(world)
    small2, small4 = measured[2]["small"][0], measured[4]["small"][0]
    large_s, large_bytes = measured[2]["large"]
    per_rank = max(0.0, (small4 - small2) / 2)
    latency = max(0.0, small2 - per_rank)
    bandwidth = large_bytes / 2 / max(large_s - small2, 1e-6)  # half of each rank's rows cross to the other
    report = {f"all_to_all_ws{world}": {size: {"seconds": s, "bytes_per_rank": n} for size, (s, n) in t.items()}
              for world, t in measured.items()}
    return Link(bandwidth, latency, per_rank), report


# The MoEs whose steps alone and at ep=2 and ep=4 price a time-shared group (`ep_link`): the second has about three
# times the first's compute, so that the line through their steps at a group size tells the ranks' compute from the
# collectives. How many collectives each MoE layer calls (ParallelMoE.forward: all-to-alls of the pair counts, the
# rows, the expert ids and the rows back, then an all-gather), as `StepTimeModel._comm` prices them.
EP_MODELS = ((256, 8, 512), (768, 8, 512))
EP_SIZES = (2, 4)
COLLECTIVES_PER_MOE_LAYER = 5


@contextmanager
def _ray_slots(cpus: int, progress: Progress, what: str) -> Iterator[bool]:
    """Ray with at least `cpus` CPU slots for a measurement: started here (and shut down after) where none runs;
    False, said to `progress`, where Ray is missing or the running one holds fewer slots."""
    try:
        import ray
    except ImportError:
        yield False
        return
    if ray.is_initialized():
        enough = ray.cluster_resources().get("CPU", 0) >= cpus
        if not enough:
            progress(f"  {what}: Ray holds fewer than {cpus} CPU slots; not measured (run calibration without a "
                     f"Ray of its caller's, or give that one {cpus} or more: slots are logical, `--num-cpus`)")
        yield enough
        return
    start_local_ray(num_cpus=max(cpus, 2))  # room for a rank besides the driver, as every measurement here needs
    try:
        yield True
    finally:
        ray.shutdown()


@dataclass(slots=True)
class EPSteps:
    """The decode steps of `EP_MODELS` alone (one process) and at each group size on Ray (by size, in the models'
    order), taken together: the machine's speed drifts by tens of percent within minutes."""

    alone: list[Point] = field(default_factory=list)
    points: dict[int, list[Point]] = field(default_factory=dict)

    def split(self, count: int) -> tuple[EPSteps, EPSteps]:
        """The first `count` models' steps, and the others'."""
        return (EPSteps(self.alone[:count], {ep: points[:count] for ep, points in self.points.items()}),
                EPSteps(self.alone[count:], {ep: points[count:] for ep, points in self.points.items()}))


# Rounds in which every model's engine at one group size takes a few decode steps in turn: a slow spell of the
# machine then reaches each model's repeats alike, rather than whichever model was being timed. The benchmark's
# held-out MoE, its steps timed before calibration's, came out +12.7% and +8.8% at ep=2 and ep=4 on average over six
# repeats (sd 8.8 and 4.3; one fit pricing them all); timed in turns with them, +3.5% and -4.0% over five (sd 6.0
# and 2.7).
EP_ROUNDS, EP_ROUND_STEPS = 4, 4


def ep_points(threads: int, quick: bool, progress: Progress, models: Sequence[Path] = ()) -> EPSteps:
    """The engine's decode step of 8 sequences of each of `EP_MODELS`, then of each MoE checkpoint in `models`
    (the caller's, timed in the same rounds), alone at `threads` threads and at each of `EP_SIZES` with its ranks
    Ray actors of `threads` threads; none without Ray, or where Ray holds too few CPU slots for every model's
    engine at the largest size at once."""
    config = EngineConfig(num_kv_blocks=512, max_num_batched_tokens=512, enable_prefix_caching=False,
                          worker_threads=threads)
    slots = max(EP_SIZES) * (len(EP_MODELS) + len(models))
    with _ray_slots(slots, progress, "EP collectives (priced from idle processes)") as usable:
        if not usable:
            return EPSteps()
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory(prefix="garrison-calibrate-") as tmp:
            directories = []
            for hidden, experts, chunk in EP_MODELS:
                directory = Path(tmp) / f"moe-{hidden}-{experts}"
                directory.mkdir()
                save_random_checkpoint(moe_llama4_raw(hidden, experts, chunk), directory)
                directories.append(directory)
            directories += models
            alone = _ep_rounds(directories, config, 1, quick, progress)
            points = {ep: _ep_rounds(directories, config, ep, quick, progress) for ep in EP_SIZES}
    return EPSteps(alone, points)


def _ep_rounds(directories: list[Path], config: EngineConfig, ep: int, quick: bool, progress: Progress
               ) -> list[Point]:
    """Each model's decode step of 8 at group size `ep`: every model's engine started, then `EP_ROUNDS` rounds of
    a few steps of each in turn; the fastest over its rounds."""
    rounds, steps = (2, 3) if quick else (EP_ROUNDS, EP_ROUND_STEPS)
    engines: list[LLMEngine] = []
    try:
        for directory in directories:
            engines.append(LLMEngine.from_path(directory, config, ParallelDims(ep=ep)) if ep > 1 else
                           LLMEngine.from_path(directory, config))
            engines[-1].generate([[3, 4, 5, 6] * 32], SamplingParams(max_tokens=4, ignore_eos=True))
        where = f"at ep={ep} on Ray" if ep > 1 else "alone"
        progress(f"  EP steps {where}: " + ", ".join(_name(e.model_config) for e in engines)
                 + f" decoding 8, {rounds} rounds of {steps} steps in turn")
        runs: list[list[Point]] = [[] for _ in engines]
        for _ in range(rounds):
            for engine, run in zip(engines, runs):
                run.append(decode_point(engine, engine.model_config, 8, 128, steps))
    finally:
        for engine in engines:
            engine.shutdown()
    return [replace(fastest_of(run), label=f"{run[0].label} ep={ep}") for run in runs]


def fastest_of(repeats: list[Point]) -> Point:
    """One point timed several times (rounds apart, so a spell of the host reaches only some): the fastest step of
    all, and every step's time."""
    return replace(min(repeats, key=lambda p: p.seconds), times=[t for p in repeats for t in p.times])


def ep_link(steps: EPSteps, fitted: Hardware, bandwidth: float) -> tuple[Link, dict[int, float], dict[str, Any]] | None:
    """How a time-shared group's EP steps run, from `ep_points`: at each group size, each model's step is its
    compute as it ran alone (the fitted profile's, through its own step alone) times a stretch, plus its
    collectives' bytes, plus a cost per collective; the line through the models' steps gives both, shared by
    every model (least squares, neither below what it can be: a stretch of 1, a cost of 0). The stretch is what
    ranks stepping at once cost each other's compute beyond sharing the cores (here 1.4-1.9x at 2 ranks on 2
    cores, where a GEMM chain in idle actors ran 1.1-1.3x: the driver, gloo's and Ray's threads want the same
    cores); the cost per collective is what the ranks wait at each, reaching it as their compute and the scheduler
    let them (0.3 ms between 2 idle processes here, 0.4-1.0 ms inside the engine's steps at ep=2). Returns the link
    (its latency by group size), the stretch by group size and what was fitted; None without two models at two
    group sizes."""
    sizes = sorted(ep for ep, points in steps.points.items() if len(points) >= 2)
    if len(sizes) < 2 or len(steps.alone) < 2:
        return None
    # each model's step as it ran alone against the fit's, which prices its compute at ep through `own_ratio`
    unpriced = replace(fitted, efficiency=replace(fitted.efficiency, own_steps={}))
    alone = own_steps(steps.alone, unpriced)
    priced = replace(fitted, nvlink=Link(bandwidth, 0.0), scaleout=Link(bandwidth, 0.0),
                     efficiency=replace(fitted.efficiency, own_steps=alone, rank_stretch={}))
    per_call, stretch, report = {}, {}, {}
    for ep in sizes:
        compute, rest, calls, measured = [], [], [], []
        for point in steps.points[ep]:
            model = StepTimeModel(point.model, priced, Precision("fp32", "fp32"), Group("both", 1, ep), on_ray=True)
            stretched, others = model.parts(model.cost(point.rows))
            compute.append(stretched)
            rest.append(others)
            calls.append(COLLECTIVES_PER_MOE_LAYER * model.counts.num_moe_layers)
            measured.append(point.seconds)
        # fitted as a stretch of 1 plus a non-negative excess: ranks at once never run faster than one alone
        beyond = [m - r - c for m, r, c in zip(measured, rest, compute)]
        excess, per_call[ep] = nnls([[c, n] for c, n in zip(compute, calls)], beyond, [1.0 / m for m in measured])
        stretch[ep] = 1.0 + excess
        # compute: as each model ran alone, over the cores its ranks share, before the stretch
        report[f"ep{ep}"] = {"steps": [{"model": _name(p.model), "step_s": m, "compute_unstretched_s": c,
                                        "collectives": n}
                                       for p, m, c, n in zip(steps.points[ep], measured, compute, calls)],
                             "stretch": stretch[ep], "per_collective_s": per_call[ep]}
    report["alone"] = [{"model": _name(p.model), "step_s": p.seconds,
                        "fitted_s": StepTimeModel(p.model, unpriced, Precision("fp32", "fp32"), Group("both", 1, 1),
                                                  on_ray=False).seconds(p.rows)} for p in steps.alone]
    (small, at_small), (large, at_large) = sorted(per_call.items())[0], sorted(per_call.items())[-1]
    per_rank = max(0.0, (at_large - at_small) / (large - small))
    return Link(bandwidth, at_small - per_rank * (small - 1), per_rank), stretch, report


@dataclass(slots=True)
class RayCosts:
    call_s: float  # an actor call's round trip
    send_s: float  # the driver's own time in it: sending the call, reading the result
    poll_s: float  # a check, without waiting, of a call in flight
    export_s: float  # a small KV export on the actor, as a rank runs it (the call, the gather, the put)
    fetch_s: float  # what the driver spends on that handoff: starting the export, reading the payload, releasing it
    link: Link  # the object store between an actor and the driver
    measured: dict[str, Any]


def ray_costs(progress: Progress) -> RayCosts | None:
    """What Ray adds to a disaggregated replica's steps and KV handoffs; None without Ray."""
    progress("  Ray: an actor call's round trip, tensors through the object store, a small KV handoff")
    with _ray_slots(1, progress, "Ray's costs") as usable:
        if not usable:
            return None
        import ray

        return _ray_measure(ray)


HANDOFF_TOKENS = 128  # of the small KV export timed for a handoff's fixed costs (its bytes are the link's)


def _ray_measure(ray: Any) -> RayCosts:
    @ray.remote(num_cpus=1)
    class Echo:
        def __init__(self) -> None:
            self.cache = torch.randn(4 * HANDOFF_TOKENS, 2, 64)  # a KV cache's slots: 2 KV heads of 64
            self.transport = RayObjectStoreTransport()

        def step(self, chunks: list[Any]) -> torch.Tensor:
            return torch.zeros(len(chunks), 512)

        def export_kv(self, tokens: int) -> Any:
            """As a rank exports a sequence: its slots gathered from every layer's K and V, sent on the transport."""
            slots = torch.randperm(self.cache.shape[0])[:tokens]
            k = torch.stack([self.cache.index_select(0, slots) for _ in range(4)])
            return self.transport.send(KVPayload(tokens, 0, k, k.clone()))

        def export(self, nbytes: int) -> list[Any]:
            return [ray.put(torch.ones(nbytes // 4))]

        def wait(self, seconds: float) -> None:
            time.sleep(seconds)

    actor = Echo.remote()
    chunks = [([1] * 8, 128, list(range(16)), True)] * 8
    ray.get(actor.step.remote(chunks))
    calls, sends = [], []
    for _ in range(30):
        start = time.perf_counter()
        ref = actor.step.remote(chunks)
        sent = time.perf_counter()
        ray.wait([ref])
        done = time.perf_counter()
        ray.get(ref)
        calls.append(time.perf_counter() - start)
        sends.append(sent - start + time.perf_counter() - done)
    moves = {}
    for nbytes in (1 << 20, 32 << 20):
        ray.get(ray.get(actor.export.remote(nbytes))[0])
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            ray.get(ray.get(actor.export.remote(nbytes))[0])
            best = min(best, time.perf_counter() - start)
        moves[nbytes] = best
    transport, exports, fetches = RayObjectStoreTransport(), [], []
    for _ in range(21):
        start = time.perf_counter()
        ref = actor.export_kv.remote(HANDOFF_TOKENS)
        sent = time.perf_counter()
        handle = ray.get(ref)
        returned = time.perf_counter()
        transport.receive([handle])
        transport.release([handle])
        exports.append(returned - start)
        fetches.append(sent - start + time.perf_counter() - returned)
    export_s, fetch_s = statistics.median(exports[1:]), statistics.median(fetches[1:])  # the first warms up
    pending = actor.wait.remote(2.0)
    polls = []
    for _ in range(50):
        start = time.perf_counter()
        ray.wait([pending], timeout=0)
        polls.append(time.perf_counter() - start)
    ray.get(pending)
    small, large = moves[1 << 20], moves[32 << 20]
    bandwidth = (31 << 20) / max(large - small, 1e-6)
    latency = max(0.0, small - (1 << 20) / bandwidth)
    call_s, send_s, poll_s = statistics.median(calls), statistics.median(sends), statistics.median(polls)
    return RayCosts(call_s, send_s, poll_s, export_s, fetch_s, Link(bandwidth, latency),
                    {"actor_call_s": call_s, "send_s": send_s, "poll_s": poll_s, "kv_export_s": export_s,
                     "kv_fetch_s": fetch_s,
                     "object_store_s": {str(k): v for k, v in moves.items()}})


# -- the profile ------------------------------------------------------------------------------------


def calibrate(out: Path, threads: int = 1, quick: bool = False, progress: Progress = print,
              extra_points: list[Point] | None = None, with_ray: bool = True,
              ep_steps: EPSteps | None = None,
              replica_steps: tuple[list[Point], list[PrefillStep]] | None = None) -> Hardware:
    """`extra_points`: steps of the models to plan (kept as their own steps too); `ep_steps` and `replica_steps`:
    `ep_points` and `replica_points` measured by the caller (next to what it compares them with, on a machine whose
    speed drifts), else measured here."""
    progress(f"calibrating this machine with {threads} torch thread(s) per rank")
    peak, bandwidth = gemm_peak_flops(threads, quick), read_bandwidth(threads)
    progress(f"  GEMM peak {peak / 1e9:.1f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    curve = gemm_curve(threads, peak, quick)
    progress("  GEMM share of peak by rows: " + ", ".join(f"{rows}: {share:.2f}" for rows, share in curve.items()))
    link, link_measured = gloo_link(progress)
    cores = os.cpu_count() or 1
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    base = Hardware(name=f"local-{threads}t", hbm_bytes=float(ram) / max(1, cores // threads), hbm_bandwidth=bandwidth,
                    flops={"fp32": peak}, nvlink=link, scaleout=link, gpus_per_node=max(1, cores // threads),
                    memory_utilization=0.8, time_shared=True, cache_bytes=last_level_cache(),
                    efficiency=Efficiency(overlap="sum", gemm_curve=curve),
                    description=f"this machine ({_cpu_name()}, {cores} cores): one rank = {threads} torch thread(s)")
    points = engine_points(threads, quick, progress, extra_points)
    efficiency, fit_report = fit(points, base)
    # the caller's models' own steps, priced by the fit just made (and so without their own ratios)
    fitted = replace(base, efficiency=efficiency)
    efficiency = replace(efficiency, own_steps=own_steps(list(extra_points or []), fitted))
    ep_measured: dict[str, Any] = {}
    if ep_steps is None and with_ray:
        ep_steps = ep_points(threads, quick, progress)
    in_steps = ep_link(ep_steps or EPSteps(), replace(base, efficiency=efficiency), link.bandwidth)
    stretch: dict[int, float] = {}
    if in_steps is not None:
        link, stretch, ep_measured = in_steps
        efficiency = replace(efficiency, rank_stretch=stretch)
        base = replace(base, nvlink=link, scaleout=link)
        progress(f"  EP steps: collectives {link.latency(2) * 1e3:.2f} ms at 2 ranks, {link.latency(4) * 1e3:.2f} ms "
                 "at 4; ranks at once against one alone " + ", ".join(f"{n}: x{f:.2f}" for n, f in stretch.items()))
    ray_measured: dict[str, Any] = {}
    kv_link = None
    costs = ray_costs(progress) if with_ray else None
    if costs is not None:
        kv_link, ray_measured = costs.link, costs.measured
        efficiency = replace(efficiency, group_call_s=costs.call_s, group_send_s=costs.send_s, poll_s=costs.poll_s,
                             kv_export_s=costs.export_s, kv_fetch_s=costs.fetch_s)
    if with_ray:
        if replica_steps is None:
            progress("  a disaggregated replica's steps (its prefill group computing, KV moving)")
            replica_steps = replica_points(threads, quick, progress)
        decode_points, prefill_steps = replica_steps
        # its prefill steps priced as that model ran alone (its own steps in the fit) with the costs just measured
        replica_model = from_hf_config(moe_llama4_raw(*REPLICA_MODEL))
        alone = own_steps([p for p in points if model_key(p.model) == model_key(replica_model)],
                          replace(base, efficiency=efficiency))
        priced_by = replace(base, efficiency=replace(efficiency, own_steps=alone))
        efficiency = replace(efficiency, replica_step_excess=step_excess(decode_points),
                             replica_prefill_excess=replica_prefill_excess(prefill_steps, replica_model, priced_by))
    hardware = replace(base, efficiency=efficiency, kv_link=kv_link, sources={
        "hbm_bandwidth": "measured: sum over a 256 MB fp32 tensor, best of 5",
        "flops": "measured: fp32 matmuls, best of three shapes",
        "gemm_curve": "measured: fp32 GEMMs of 1 to 256 rows over 512 MB of weights, scaled by the fit to the "
                      "engine's steps",
        "nvlink": "measured: bandwidth from gloo all_to_all_single of 4 MB between 2 processes; the cost per call "
                  "from the engine's own EP steps (two MoEs at ep=2 and ep=4 on Ray, beyond their compute), or "
                  "without Ray from all_to_all_single between 2 and 4 idle processes",
        "rank_stretch": "fitted: the engine's EP steps of two MoEs at ep=2 and ep=4 against their steps alone",
        "efficiency": f"fitted to {len(points)} engine steps of random models (see measurements.fit); the steps' "
                      "spread from their repeats, alone and inside a disaggregated replica",
        "kv_link": "measured: tensors through Ray's object store between an actor and the driver"})
    measurements = {"threads": threads, "gemm_peak_flops": peak, "read_bandwidth": bandwidth, "gemm_curve": curve,
                    "collectives": {**link_measured, "in_ep_steps": ep_measured},
                    "rank_stretch": stretch, "ray": ray_measured,
                    "fit": fit_report, "load_average": list(os.getloadavg())}
    save_profile(hardware, out, measurements)
    return hardware


def last_level_cache() -> float:
    """Bytes of the largest CPU cache (sysfs), 0 when unknown."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(float(text.rstrip("KM") or 0) * scale)
    return max(sizes, default=0.0)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
