"""Layouts within a GPU budget: which fit, which meet the SLOs, the best by goodput per GPU, the Pareto front,
why each other one fails, and what an impossible ask would need.

A layout is first checked against memory (weights, activations and the longest context per GPU), then one
replica is simulated with its share of the workload (`simulate`), so every number below comes from the engine's
own scheduling policy on the time model's clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from garrison_workers.config import ModelConfig
from garrison_workers.errors import LayoutError

from garrison.planner.hardware import Hardware, Link
from garrison.planner.layout import Group, Layout
from garrison.planner.memory import EngineLimits, KVLayout, MemoryBreakdown, Precision, breakdown, sequence_kv_bytes
from garrison.planner.simulate import SimEngine, SimResult, Simulation, percentile
from garrison.planner.step_time import StepTimeModel
from garrison.planner.workload import SLO, Workload

MAX_SCALE_OUT = 16  # how many times the budget the "GPUs that would meet it" search may go


@dataclass(slots=True, frozen=True)
class Ask:
    model: ModelConfig
    model_name: str
    hardware: Hardware
    precision: Precision
    workload: Workload
    slo: SLO
    gpu_budget: int
    max_context: int  # the longest context (prompt + output) one sequence must be able to reach
    kv_layout: KVLayout = "hybrid"
    prefill_limits: EngineLimits = EngineLimits()
    decode_limits: EngineLimits = EngineLimits()
    imbalance: float = 1.0
    disaggregated: bool = True  # also consider prefill/decode layouts


@dataclass(slots=True)
class Candidate:
    layout: Layout
    memory: dict[str, MemoryBreakdown]  # by role of the group
    result: SimResult | None = None
    failure: str | None = None  # why it is rejected: memory, TTFT or TPOT, with the numbers
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def meets(self) -> bool:
        return self.failure is None


@dataclass(slots=True)
class Plan:
    ask: Ask
    candidates: list[Candidate]
    best: Candidate | None
    pareto: list[Candidate]
    impossible: dict[str, object] | None = None


# -- candidate layouts ------------------------------------------------------------------------------


def group_shapes(model: ModelConfig, hardware: Hardware, max_gpus: int) -> list[tuple[int, int]]:
    """(tp, ep) pairs that fit the model, in powers of two, within one node or on whole nodes."""
    shapes = []
    eps = [1] + [2 ** i for i in range(1, 8) if model.moe_layers and 2 ** i <= model.num_experts]
    for tp in (1, 2, 4, 8, 16):
        for ep in eps:
            gpus = tp * ep
            whole = gpus <= hardware.gpus_per_node or gpus % hardware.gpus_per_node == 0 or hardware.time_shared
            if gpus > max_gpus or not whole:
                continue
            try:
                Layout.colocated(tp, ep).validate(model, hardware.gpus_per_node if not hardware.time_shared else gpus)
            except LayoutError:
                continue
            shapes.append((tp, ep))
    return shapes


def group_memory(ask: Ask, group: Group) -> MemoryBreakdown:
    limits = ask.prefill_limits if group.role == "prefill" else ask.decode_limits
    return breakdown(ask.model, ask.hardware, ask.precision, group.tp, group.ep, limits, ask.kv_layout)


def memory_failure(ask: Ask, layout: Layout) -> tuple[dict[str, MemoryBreakdown], str | None]:
    memory = {g.role: group_memory(ask, g) for g in layout.groups}
    for role, mem in memory.items():
        usable = ask.hardware.usable_bytes
        if not mem.fits:
            return memory, (f"memory: {role} group {layout.groups[0 if role != 'decode' else -1].describe()} needs "
                            f"{(mem.weights + mem.activations) / 1e9:.1f} GB per GPU for weights and activations, "
                            f"{usable / 1e9:.1f} GB usable")
        if mem.max_context < ask.max_context:
            return memory, (f"memory: the {role} group holds a {mem.max_context:,}-token context per sequence, "
                            f"{ask.max_context:,} asked")
    return memory, None


# -- simulating one replica -------------------------------------------------------------------------


def sim_blocks(ask: Ask, group: Group, mem: MemoryBreakdown, limits: EngineLimits) -> int:
    """Blocks of the (uniform) block manager that hold as many tokens as the memory model allows at the
    workload's typical context (hybrid KV holds more tokens per byte than every-layer blocks would)."""
    typical = max(1, min(ask.max_context, ask.workload.longest_prompt))
    per_token = sequence_kv_bytes(ask.model, ask.precision.kv, group.tp, typical, ask.kv_layout) / typical
    fit = int(mem.kv_cache // (per_token * limits.block_size))
    # More blocks than every sequence of a full batch at the longest context can use change nothing (and cost
    # the block manager's setup): cap there.
    most = limits.max_num_seqs * -(-(ask.max_context + 1) // limits.block_size)
    return max(1, min(fit, most))


def engine_for(ask: Ask, layout: Layout, group: Group, mem: MemoryBreakdown, seed: int = 0) -> SimEngine:
    limits = ask.prefill_limits if group.role == "prefill" else ask.decode_limits
    model = StepTimeModel(ask.model, ask.hardware, ask.precision, group, on_ray=True, imbalance=ask.imbalance,
                          key_block=limits.attention_key_block)
    # On a time-shared host a disaggregated replica's groups share the cores: its steps spread as measured there
    replica = ask.hardware.time_shared and layout.is_disaggregated
    return SimEngine.build(model, sim_blocks(ask, group, mem, limits), limits.block_size, limits.max_num_seqs,
                           limits.max_num_batched_tokens, seed, replica)


def handoff_link(hardware: Hardware, layout: Layout) -> Link:
    if hardware.kv_link is not None:
        return hardware.kv_link
    spans = layout.gpus_per_replica > hardware.gpus_per_node
    return hardware.scaleout if spans else hardware.nvlink


def simulate(ask: Ask, layout: Layout, memory: dict[str, MemoryBreakdown]) -> SimResult:
    arrivals = ask.workload.arrivals(layout.replicas)
    sim = Simulation(arrivals)
    if not layout.is_disaggregated:
        return sim.run_colocated(engine_for(ask, layout, layout.decode, memory["both"]))
    prefill = engine_for(ask, layout, layout.prefill, memory["prefill"])
    decoders = [engine_for(ask, layout, g, memory["decode"], seed) for seed, g in enumerate(layout.groups[1:], 1)]
    link = handoff_link(ask.hardware, layout)
    kv_token = 2 * ask.model.num_kv_heads * ask.model.head_dim * ask.model.num_layers * prefill.step_model.kv_bytes
    ranks = min(layout.prefill.tp, layout.decode.tp)
    eff = ask.hardware.efficiency

    def handoff(tokens: int) -> tuple[float, float]:
        nbytes = tokens * kv_token / ranks
        return (link.latency(2) + nbytes / (link.bandwidth * link.efficiency),
                nbytes / (ask.hardware.hbm_bandwidth * eff.memory))

    return sim.run_disaggregated(prefill, decoders, handoff, costs=eff)


def figures(ask: Ask, layout: Layout, result: SimResult) -> dict[str, float]:
    p = ask.slo.percentile
    ttfts, tpots = result.ttfts(), result.tpots()
    good = [r for r in result.records if r.failed is None and r.finished
            and (ask.slo.ttft_s is None or r.ttft <= ask.slo.ttft_s)
            and (ask.slo.tpot_s is None or (r.tpot or 0.0) <= ask.slo.tpot_s)]
    good_tokens = sum(len(r.token_times) for r in good)
    seconds = result.end_s or math.inf
    mean_tpot = sum(tpots) / len(tpots) if tpots else math.nan
    return {
        "ttft_p50_s": percentile(ttfts, 50), f"ttft_p{p:g}_s": percentile(ttfts, p),
        "tpot_p50_s": percentile(tpots, 50), f"tpot_p{p:g}_s": percentile(tpots, p),
        "tokens_per_s": result.tokens_per_s * layout.replicas,
        "tokens_per_s_per_gpu": result.tokens_per_s * layout.replicas / layout.gpus,
        "tokens_per_s_per_user": 1 / mean_tpot if mean_tpot and mean_tpot > 0 else math.nan,
        "goodput_per_gpu": good_tokens / seconds * layout.replicas / layout.gpus,
        "requests": float(len(result.records)), "failed_requests": float(len(result.failures)),
    }


def slo_failure(ask: Ask, result: SimResult, figs: dict[str, float]) -> str | None:
    p = ask.slo.percentile
    if result.truncated:
        return "overloaded: requests were still queued when the simulation's limit was reached"
    if result.failures:
        why = next((r.failed for r in result.failures if r.failed), "did not finish")
        return f"capacity: {len(result.failures)} requests failed ({why})"
    ratios = ratio_over_slo(ask, figs)
    worst = max(ratios, key=lambda name: ratios[name], default=None)
    if worst is None or ratios[worst] <= 1:
        return None
    got = figs[f"{worst}_p{p:g}_s"]
    target = ask.slo.ttft_s if worst == "ttft" else ask.slo.tpot_s
    return f"{worst.upper()}: p{p:g} {_time(got)} > {_time(target or 0)}"


def ratio_over_slo(ask: Ask, figs: dict[str, float]) -> dict[str, float]:
    p = ask.slo.percentile
    out = {}
    if ask.slo.ttft_s:
        out["ttft"] = figs[f"ttft_p{p:g}_s"] / ask.slo.ttft_s
    if ask.slo.tpot_s:
        out["tpot"] = figs[f"tpot_p{p:g}_s"] / ask.slo.tpot_s
    return out


def evaluate(ask: Ask, layout: Layout) -> Candidate:
    memory, failure = memory_failure(ask, layout)
    candidate = Candidate(layout, memory, failure=failure)
    if failure is not None:
        return candidate
    candidate.result = simulate(ask, layout, memory)
    candidate.figures = figures(ask, layout, candidate.result)
    candidate.failure = slo_failure(ask, candidate.result, candidate.figures)
    return candidate


# -- the search -------------------------------------------------------------------------------------


def layouts(ask: Ask, budget: int) -> list[Layout]:
    hw = ask.hardware
    shapes = group_shapes(ask.model, hw, budget)
    out = [Layout.colocated(tp, ep, r) for tp, ep in shapes for r in _replica_counts(budget // (tp * ep))]
    if ask.disaggregated:
        fitting = sorted((s for s in shapes if memory_failure(ask, Layout.colocated(*s))[1] is None),
                         key=lambda s: (s[0] * s[1], -s[0]))[:4]  # the smallest groups, TP first
        for p_shape in fitting:
            for d_shape in fitting:
                for n in (1, 2):
                    per = p_shape[0] * p_shape[1] + n * d_shape[0] * d_shape[1]
                    out += [Layout.disaggregated(p_shape, d_shape, n, r) for r in _replica_counts(budget // per)]
    return out


def _replica_counts(most: int) -> list[int]:
    """1, 2, 4, ... up to `most`, and `most` itself."""
    counts = sorted({2 ** i for i in range(max(1, most).bit_length()) if 2 ** i <= most} | {most})
    return [c for c in counts if c >= 1]


def search(ask: Ask, progress: Callable[[list[Layout]], Iterable[Layout]] = iter) -> Plan:
    """Every layout of the budget evaluated; `progress` wraps them as they are (the CLI's progress bar: a search
    of many layouts simulates for minutes)."""
    candidates = [evaluate(ask, layout) for layout in progress(layouts(ask, ask.gpu_budget))]
    meeting = [c for c in candidates if c.meets]
    best = max(meeting, key=lambda c: (c.figures["goodput_per_gpu"], -c.layout.gpus), default=None)
    plan = Plan(ask, candidates, best, pareto_front(candidates))
    if best is None:
        plan.impossible = impossible(ask, candidates)
    return plan


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """Simulated layouts no other beats on both tokens/s per GPU and tokens/s per user."""
    points = [c for c in candidates if c.figures and math.isfinite(c.figures["tokens_per_s_per_user"])]

    def beaten(c: Candidate) -> bool:
        a = c.figures
        return any(o.figures["tokens_per_s_per_gpu"] >= a["tokens_per_s_per_gpu"]
                   and o.figures["tokens_per_s_per_user"] >= a["tokens_per_s_per_user"]
                   and o.figures != a for o in points)

    return sorted((c for c in points if not beaten(c)), key=lambda c: c.figures["tokens_per_s_per_user"])


def impossible(ask: Ask, candidates: list[Candidate]) -> dict[str, object]:
    """No layout in the budget meets the SLOs: what fails first, the best the budget buys, and the GPUs that
    would meet them (the best shape replicated further; where nothing fits, the smallest layout that does,
    simulated and replicated likewise), or why more GPUs cannot help."""
    simulated = [c for c in candidates if c.figures]
    if not simulated:
        closest = min(candidates, key=lambda c: max(m.weights + m.activations for m in c.memory.values()),
                      default=None)  # the least short of memory
        return {"fails_first": "memory", "reason": closest.failure if closest else "no layout fits the budget",
                "best_in_budget": None, "gpus_needed": gpus_to_fit_and_meet(ask)}
    closest = min(simulated, key=lambda c: max(ratio_over_slo(ask, c.figures).values(), default=0.0))
    ratios = ratio_over_slo(ask, closest.figures)
    first = max(ratios, key=lambda k: ratios[k]) if ratios else "capacity"
    return {"fails_first": first, "reason": closest.failure, "best_in_budget": closest,
            "gpus_needed": gpus_to_meet(ask, closest.layout)}


def gpus_to_meet(ask: Ask, layout: Layout) -> int | None:
    """Replicate `layout`'s replica until the SLOs hold (up to MAX_SCALE_OUT × the budget); None if they never do."""
    replicas = layout.replicas
    while layout.gpus_per_replica * replicas <= MAX_SCALE_OUT * max(ask.gpu_budget, layout.gpus_per_replica):
        replicas *= 2
        candidate = evaluate(ask, Layout(layout.groups, replicas))
        if candidate.meets:
            low = replicas // 2 + 1
            while low < replicas:  # the fewest replicas that meet it
                mid = (low + replicas) // 2
                if evaluate(ask, Layout(layout.groups, mid)).meets:
                    replicas = mid
                else:
                    low = mid + 1
            return replicas * layout.gpus_per_replica
    return None


def gpus_to_fit_and_meet(ask: Ask) -> int | None:
    """The GPUs of the smallest colocated layout whose memory holds the ask, replicated until the SLOs hold: the
    fit alone would name GPUs that then miss a TPOT they can never reach."""
    for gpus in (1, 2, 4, 8, 16, 32, 64, 128):
        for tp, ep in group_shapes(ask.model, ask.hardware, gpus):
            layout = Layout.colocated(tp, ep)
            if tp * ep == gpus and memory_failure(ask, layout)[1] is None:
                return gpus if evaluate(ask, layout).meets else gpus_to_meet(ask, layout)
    return None


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
