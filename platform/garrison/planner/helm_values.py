"""The planned deployment as a values fragment for the Helm chart (helm/garrison/values.yaml's `models` and
`workers` keys)."""

from __future__ import annotations

from typing import Any

from garrison.planner.search import Candidate, Plan

ENGINE_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16", "int4": "bfloat16",
                "int8": "bfloat16", "q4_0": "bfloat16", "q4_1": "bfloat16", "q8_0": "bfloat16"}


def values(plan: Plan, source: str, candidate: Candidate | None = None) -> dict[str, Any]:
    chosen = candidate or plan.best
    if chosen is None:
        raise ValueError("no layout meets the ask: there are no Helm values to write")
    ask, layout = plan.ask, chosen.layout
    gpn = ask.hardware.gpus_per_node
    limits = ask.decode_limits
    if len({g.gpus for g in layout.groups}) > 1:  # the chart sizes a model's worker pods once for all its groups
        raise ValueError(f"the chart gives every group of a model the same pods (gpusPerPod x numOfHosts), but this "
                         f"layout's groups have {', '.join(str(g.gpus) for g in layout.groups)} GPUs: pick a layout "
                         f"whose groups are one size, or write the values by hand")
    largest = layout.groups[0]
    model = {
        "name": ask.model_name, "source": source, "replicas": layout.replicas,
        "engine": {
            "kv_cache_bytes": int(max(0.0, min(m.kv_cache for m in chosen.memory.values()))),
            "max_num_seqs": limits.max_num_seqs, "max_num_batched_tokens": ask.prefill_limits.max_num_batched_tokens,
            "dtype": ENGINE_DTYPE[ask.precision.weights], "device": "cuda",
        },
        "groups": [{"role": g.role, "tp": g.tp, "ep": g.ep} for g in layout.groups],
        "gpusPerPod": min(largest.gpus, gpn), "numOfHosts": largest.hosts(gpn),
    }
    return {"models": [model], "workers": {"gpuType": ask.hardware.name}}
