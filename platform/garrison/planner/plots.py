"""PNG plots of a plan (matplotlib, the `plan` extra): the Pareto front, memory per GPU, TTFT against prompt length."""

from __future__ import annotations

import math
from pathlib import Path

from garrison_workers.errors import InvalidRequestError

from garrison.planner.memory import MemoryBreakdown
from garrison.planner.search import Ask, Candidate, Plan
from garrison.planner.simulate import SimEngine, Simulation
from garrison.planner.step_time import StepTimeModel
from garrison.planner.workload import OpenLoop, Request

GB = 1e9
MEMORY_PARTS = (("embeddings", "embeddings + LM head"), ("attention", "attention"), ("dense", "dense MLP + shared"),
                ("experts", "routed experts"), ("activations", "activations"), ("kv_cache", "KV cache"),
                ("reserved", "reserved"))


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidRequestError("plots need matplotlib: pip install 'garrison[plan]'") from None
    return plt


def write_all(plan: Plan, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [pareto(plan, directory / "pareto.png"), memory(plan, directory / "memory.png")]
    chosen = plan.best or (plan.impossible or {}).get("best_in_budget")
    if isinstance(chosen, Candidate):
        paths.append(ttft_curve(plan.ask, chosen, directory / "ttft.png"))
    return paths


def pareto(plan: Plan, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = [c for c in plan.candidates if c.figures and math.isfinite(c.figures["tokens_per_s_per_user"])]
    for meets, colour, label in ((True, "tab:green", "meets the SLOs"), (False, "tab:gray", "misses an SLO")):
        chosen = [c for c in points if c.meets == meets]
        ax.scatter([c.figures["tokens_per_s_per_user"] for c in chosen],
                   [c.figures["tokens_per_s_per_gpu"] for c in chosen], c=colour, label=label, alpha=0.7)
    front = plan.pareto
    ax.plot([c.figures["tokens_per_s_per_user"] for c in front], [c.figures["tokens_per_s_per_gpu"] for c in front],
            "-", color="tab:blue", label="Pareto front")
    for c in front:
        ax.annotate(c.layout.describe(), (c.figures["tokens_per_s_per_user"], c.figures["tokens_per_s_per_gpu"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    if plan.best is not None:
        b = plan.best.figures
        ax.scatter([b["tokens_per_s_per_user"]], [b["tokens_per_s_per_gpu"]], s=160, facecolors="none",
                   edgecolors="tab:red", label=f"best: {plan.best.layout.describe()}")
    if not points:  # every layout failed on memory: say so rather than draw empty axes around zero
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "no layout within the budget fits in memory:\nnothing was simulated (see memory.png)",
                ha="center", va="center", fontsize=11)
    ax.set_xlabel("tokens/s per user (1 / mean TPOT)")
    ax.set_ylabel("tokens/s per GPU")
    ax.set_title(f"{plan.ask.model_name} on {plan.ask.hardware.name}: layouts within {plan.ask.gpu_budget} GPUs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def memory(plan: Plan, path: Path) -> Path:
    """Stacked bars per GPU, one per group shape that was tried (the best layout's first)."""
    plt = _pyplot()
    shapes: dict[str, MemoryBreakdown] = {}
    for c in ([plan.best] if plan.best else []) + plan.candidates:
        for group in c.layout.groups:
            shapes.setdefault(group.describe(), c.memory[group.role])
    labels = [name if shapes[name].fits else f"{name}\n(does not fit)" for name in shapes]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels) + 3), 5.5))
    bottoms = [0.0] * len(labels)
    for part, label in MEMORY_PARTS:
        heights = [max(0.0, getattr(shapes[name], part)) / GB for name in shapes]
        ax.bar(labels, heights, bottom=bottoms, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.axhline(plan.ask.hardware.hbm_bytes / GB, color="black", linestyle="--", linewidth=1, label="HBM")
    ax.set_ylabel("GB per GPU")
    ax.set_title(f"{plan.ask.model_name} ({plan.ask.precision.weights} weights, {plan.ask.precision.kv} KV) on "
                 f"{plan.ask.hardware.name}: memory per GPU by group shape", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def ttft_points(ask: Ask, candidate: Candidate, points: int = 12) -> list[tuple[int, float]]:
    """TTFT of one prompt alone on the layout's prefill (or only) group, from 1k tokens to the longest context
    the group holds (chunked prefill under the engine's token budget, as the simulation schedules it)."""
    layout = candidate.layout
    group = layout.prefill if layout.is_disaggregated else layout.decode
    mem = candidate.memory[group.role]
    limits = ask.prefill_limits if layout.is_disaggregated else ask.decode_limits
    longest = max(1025, mem.max_context - 1)
    lengths = sorted({round(1024 * (longest / 1024) ** (i / (points - 1))) for i in range(points)})
    step_model = StepTimeModel(ask.model, ask.hardware, ask.precision, group, imbalance=ask.imbalance,
                               key_block=limits.attention_key_block)
    out = []
    for n in lengths:
        blocks = -(-(n + 1) // limits.block_size)
        engine = SimEngine.build(step_model, blocks, limits.block_size, limits.max_num_seqs,
                                 limits.max_num_batched_tokens)
        result = Simulation(OpenLoop([Request("one", 0.0, n, 1)])).run_colocated(engine)
        out.append((n, result.records[0].ttft))
    return out


def ttft_curve(ask: Ask, candidate: Candidate, path: Path) -> Path:
    plt = _pyplot()
    data = ttft_points(ask, candidate)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.plot([n for n, _ in data], [t for _, t in data], "o-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if ask.slo.ttft_s:
        ax.axhline(ask.slo.ttft_s, color="tab:red", linestyle="--", label=f"TTFT SLO {ask.slo.ttft_s:g} s")
        ax.legend()
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token, alone (s)")
    ax.set_title(f"{ask.model_name} on {ask.hardware.name}, {candidate.layout.describe()}: TTFT of one prompt, up to "
                 "the longest context", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
