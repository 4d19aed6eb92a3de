"""What `garrison plan` prints: a table for people, one JSON document for scripts."""

from __future__ import annotations

import math
from typing import Any

from garrison.planner.memory import MemoryBreakdown
from garrison.planner.models import model_key
from garrison.planner.search import Candidate, Plan

GB = 1e9


def _ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def header(plan: Plan) -> list[str]:
    ask, hw = plan.ask, plan.ask.hardware
    calibrated = "calibrated on this hardware" if hw.efficiency.calibrated else (
        "uncalibrated catalog defaults (run `garrison plan calibrate` on the node and pass its profile)")
    if own_steps(plan):
        calibrated += ", steps priced from this model's own (`plan calibrate --model`)"
    return [
        (f"model      {ask.model_name}: weights {ask.precision.weights}, KV {ask.precision.kv} "
         f"({ask.kv_layout} KV layout)"),
        (f"hardware   {hw.name}: {hw.hbm_bytes / GB:.0f} GB, {hw.gpus_per_node} GPUs per node; "
         f"efficiencies {calibrated}"),
        f"workload   {ask.workload.describe()}; longest context {ask.max_context:,} tokens",
        f"SLO        {ask.slo.describe()}; budget {ask.gpu_budget} GPUs",
    ]


def own_steps(plan: Plan) -> bool:
    """Whether the profile timed this model's own steps (`Efficiency.own_steps`), which then price its steps."""
    return model_key(plan.ask.model) in plan.ask.hardware.efficiency.own_steps


def memory_line(role: str, mem: MemoryBreakdown) -> str:
    return (f"  {role:<8} per GPU: weights {mem.weights / GB:.1f} GB (embeddings {mem.embeddings / GB:.1f}, attention "
            f"{mem.attention / GB:.1f}, dense {mem.dense / GB:.1f}, experts {mem.experts / GB:.1f}), activations "
            f"{mem.activations / GB:.1f}, KV cache {max(mem.kv_cache, 0) / GB:.1f} GB -> longest context "
            f"{mem.max_context:,} tokens")


def candidate_row(plan: Plan, c: Candidate) -> list[str]:
    f, p = c.figures, plan.ask.slo.percentile
    hw = plan.ask.hardware
    return [c.layout.describe(), str(c.layout.gpus), str(c.layout.nodes(hw.gpus_per_node)),
            _ms(f.get(f"ttft_p{p:g}_s")), _ms(f.get(f"tpot_p{p:g}_s")), _num(f.get("tokens_per_s_per_gpu")),
            _num(f.get("tokens_per_s_per_user")), _num(f.get("goodput_per_gpu")),
            "meets SLO" if c.meets else c.failure or "-"]


def table(plan: Plan, limit: int = 25) -> str:
    p = plan.ask.slo.percentile
    lines = header(plan) + [""]
    if plan.best is not None:
        b = plan.best
        lines.append(f"BEST       {b.layout.describe()}: {b.layout.gpus} GPUs on "
                     f"{b.layout.nodes(plan.ask.hardware.gpus_per_node)} node(s); TTFT p50 "
                     f"{_ms(b.figures['ttft_p50_s'])}, p{p:g} {_ms(b.figures[f'ttft_p{p:g}_s'])}; TPOT p50 "
                     f"{_ms(b.figures['tpot_p50_s'])}, p{p:g} {_ms(b.figures[f'tpot_p{p:g}_s'])}; "
                     f"{_num(b.figures['tokens_per_s'])} tokens/s")
        lines += [memory_line(role, mem) for role, mem in b.memory.items()]
    else:
        lines += impossible_lines(plan)
    heads = ["layout", "gpus", "nodes", f"ttft p{p:g}", f"tpot p{p:g}", "tok/s/gpu", "tok/s/user", "goodput/gpu",
             "verdict"]
    ranked = sorted(plan.candidates, key=_rank)
    rows = [candidate_row(plan, c) for c in ranked[:limit]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(heads)]
    lines += ["", "  ".join(h.upper().ljust(w) for h, w in zip(heads, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    if len(ranked) > limit:
        lines.append(f"... {len(ranked) - limit} more layouts (--json lists all)")
    lines.append("Pareto front (tokens/s per GPU against tokens/s per user): " + (
        ", ".join(c.layout.describe() for c in plan.pareto) or "-"))
    return "\n".join(lines)


def _rank(c: Candidate) -> tuple[int, float]:
    return (0 if c.meets else 1 if c.figures else 2, -c.figures.get("goodput_per_gpu", 0.0))


def impossible_lines(plan: Plan) -> list[str]:
    info = plan.impossible or {}
    lines = [f"NO LAYOUT of at most {plan.ask.gpu_budget} GPUs meets the ask."]
    first = info.get("fails_first")
    lines.append(f"  fails first: {str(first).upper()} ({info.get('reason')})")
    best = info.get("best_in_budget")
    if isinstance(best, Candidate):
        p = plan.ask.slo.percentile
        lines.append(f"  best the budget buys: {best.layout.describe()} ({best.layout.gpus} GPUs): TTFT "
                     f"p{p:g} {_ms(best.figures[f'ttft_p{p:g}_s'])}, TPOT p{p:g} "
                     f"{_ms(best.figures[f'tpot_p{p:g}_s'])}, {_num(best.figures['tokens_per_s'])} tokens/s")
    needed = info.get("gpus_needed")
    lines.append(f"  GPUs that would meet it: {needed}" if needed else
                 "  GPUs that would meet it: none found; more replicas do not help (relax the SLO, shorten the "
                 "context, or choose faster hardware or lower precision)")
    return lines


def to_json(plan: Plan) -> dict[str, Any]:
    ask = plan.ask
    info = dict(plan.impossible or {})
    if isinstance(info.get("best_in_budget"), Candidate):
        info["best_in_budget"] = candidate_json(plan, info["best_in_budget"])  # type: ignore[arg-type]
    return {
        "model": ask.model_name, "hardware": ask.hardware.name, "calibrated": ask.hardware.efficiency.calibrated,
        "own_steps": own_steps(plan),
        "precision": {"weights": ask.precision.weights, "kv": ask.precision.kv}, "kv_layout": ask.kv_layout,
        "workload": ask.workload.describe(), "max_context": ask.max_context, "gpu_budget": ask.gpu_budget,
        "slo": {"ttft_s": ask.slo.ttft_s, "tpot_s": ask.slo.tpot_s, "percentile": ask.slo.percentile},
        "best": candidate_json(plan, plan.best) if plan.best else None,
        "pareto": [c.layout.describe() for c in plan.pareto],
        "impossible": info or None,
        "candidates": [candidate_json(plan, c) for c in sorted(plan.candidates, key=_rank)],
    }


def candidate_json(plan: Plan, c: Candidate) -> dict[str, Any]:
    gpn = plan.ask.hardware.gpus_per_node
    return {
        "layout": c.layout.describe(), "replicas": c.layout.replicas, "gpus": c.layout.gpus,
        "nodes": c.layout.nodes(gpn),
        "groups": [{"role": g.role, "tp": g.tp, "ep": g.ep} for g in c.layout.groups],
        "meets_slo": c.meets, "failure": c.failure,
        "figures": {k: (v if math.isfinite(v) else None) for k, v in c.figures.items()},
        "memory_per_gpu": {role: m.to_dict() for role, m in c.memory.items()},
    }
