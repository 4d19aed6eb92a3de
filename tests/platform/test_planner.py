"""The capacity planner: memory arithmetic checked by hand, the simulation against the engine's own schedule,
the search's answers to feasible and impossible asks, and what users see from `garrison plan`."""

from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import yaml
from garrison.cli import main
from garrison.planner import calibrate, helm_values, report
from garrison.planner.calibrate import (EP_MODELS, REPLICA_MODEL, REPLICA_WINDOWS, EPSteps, Point, decode_point,
                                       dense_llama, ep_link, fit, model_points, moe_llama4, moe_llama4_raw, nnls,
                                       own_steps, prefill_points, random_engine, replica_points,
                                       replica_prefill_excess, save_random_checkpoint, step_excess)
from garrison.planner.dtypes import WEIGHT_BYTES
from garrison.planner.hardware import (CATALOG_FILE, Efficiency, Hardware, Link, load_catalog, resolve_hardware,
                                      save_profile)
from garrison.planner.layout import Group, Layout
from garrison.planner.memory import EngineLimits, Precision, activation_bytes, breakdown
from garrison.planner.models import model_key, resolve_model
from garrison.planner.search import Ask, Plan, evaluate, search
from garrison.planner.simulate import SimEngine, Simulation, StepSpread
from garrison.planner.step_time import Row, StepTimeModel, attended_keys, step_kind
from garrison.planner.workload import SLO, LengthDist, OpenLoop, Request, Workload, load_trace
from garrison_workers.attention import causal_masks
from garrison_workers.engine.config import EngineConfig
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.errors import GarrisonError, InvalidRequestError

GB = 1e9

# -- memory arithmetic, by hand -----------------------------------------------------------------------

# Llama 4 Scout / Maverick share their attention and expert shapes: hidden 5120, 40 query heads and 8 KV heads of
# 128, expert width 8192 (three matrices of 5120 x 8192), a 202,048-token vocabulary with untied LM head.
VOCAB_PARAMS = 2 * 202_048 * 5120  # embedding + LM head
ATTENTION_LAYER = 5120 * 128 * (40 + 40 + 8 + 8)  # q, o, k, v
EXPERT = 3 * 5120 * 8192


def test_scout_on_8_h200_at_tp8_by_hand() -> None:
    _, scout = resolve_model("llama4-scout")
    h200 = resolve_hardware("H200")
    mem = breakdown(scout, h200, Precision("bf16", "bf16"), tp=8, ep=1)
    assert mem.embeddings == VOCAB_PARAMS * 2  # whole on every rank
    assert mem.attention == 48 * ATTENTION_LAYER * 2 / 8
    # 48 MoE layers: shared expert split by TP, router (16 experts) and 97 norms whole
    assert mem.dense == 48 * EXPERT * 2 / 8 + (48 * 5120 * 16 + 97 * 5120) * 2
    assert mem.experts == 16 * 48 * EXPERT * 2 / 8  # all 16 experts (ep=1), an eighth of each one's width
    usable = 141e9 * 0.9 - 2e9  # memory_utilization and runtime overhead of the catalog entry
    kv_budget = usable - mem.weights - mem.activations
    assert mem.kv_cache == pytest.approx(kv_budget)
    # one KV head per rank: K and V of 128 bf16 values = 512 bytes per layer per token; 12 global (NoPE) layers
    # grow with the context, 36 chunked layers hold one 8192-token chunk
    per = 2 * 1 * 128 * 2
    assert mem.kv_context == int((kv_budget / per - 36 * 8192) // 12)
    assert mem.max_context == min(mem.kv_context, 10_485_760)
    uniform = breakdown(scout, h200, Precision("bf16", "bf16"), tp=8, ep=1, kv_layout="uniform")
    assert uniform.kv_context == int(kv_budget // (per * 48))
    assert 3_500_000 < uniform.kv_context < 4_500_000  # vLLM published 3.6M for this node (2025-04)


def test_maverick_fp8_on_8_h100_experts_split_by_ep() -> None:
    _, maverick = resolve_model("maverick")
    h100 = resolve_hardware("h100-sxm")
    mem = breakdown(maverick, h100, Precision("fp8", "bf16"), tp=2, ep=4)
    fp8 = 1 + 4 / 5120  # a byte per weight and a float32 scale per output channel of 5120 inputs
    assert WEIGHT_BYTES["fp8"] == fp8
    assert mem.experts == pytest.approx(24 * (128 // 4) * EXPERT * fp8 / 2)  # 24 MoE layers, 32 experts per EP rank
    # 24 dense layers of width 16384 and 24 shared experts, fp8 and split by TP; router (128) and norms in bf16
    assert mem.dense == pytest.approx((24 * 3 * 5120 * 16384 + 24 * EXPERT) * fp8 / 2
                                      + (24 * 5120 * 128 + 97 * 5120) * 2)
    assert mem.attention == pytest.approx(48 * ATTENTION_LAYER * fp8 / 2)
    assert mem.embeddings == VOCAB_PARAMS * 2
    per_layer_token = 2 * (8 // 2) * 128 * 2
    kv_budget = 80e9 * 0.9 - 2e9 - mem.weights - mem.activations
    assert mem.kv_context == int((kv_budget / per_layer_token - 36 * 8192) // 12)


def test_dense_llama_int4_and_a_layout_that_does_not_fit() -> None:
    _, llama = resolve_model("llama3-70b")
    h100 = resolve_hardware("H100-SXM")
    params = 80 * (8192 * 128 * (64 + 64 + 8 + 8) + 3 * 8192 * 28672)
    int4 = breakdown(llama, h100, Precision("int4", "fp8"), tp=1, ep=1)
    assert WEIGHT_BYTES["int4"] == 0.5 + 2 * 4 / 128  # 4-bit codes, a float32 scale and zero per 128 inputs
    assert int4.attention + int4.dense == pytest.approx(params * (0.5 + 8 / 128) + 161 * 8192 * 2)
    per_token = 2 * 8 * 128 * 1 * 80  # fp8 KV, every layer global
    assert int4.kv_context == int(int4.kv_cache // per_token)
    assert not breakdown(llama, h100, Precision("bf16", "bf16"), tp=1, ep=1).fits  # 141 GB of weights


def test_activations_grow_with_the_token_budget() -> None:
    _, scout = resolve_model("scout")
    small = activation_bytes(scout, Precision(), 8, EngineLimits(max_num_batched_tokens=2048))
    large = activation_bytes(scout, Precision(), 8, EngineLimits(max_num_batched_tokens=16384))
    assert 0 < small < large < 8 * GB


def test_every_catalog_figure_names_its_source() -> None:
    raw = yaml.safe_load(CATALOG_FILE.read_text())["hardware"]
    assert set(raw) == {"H100-SXM", "H200", "B200"}
    for name, entry in raw.items():
        figures = {"hbm_bytes", "hbm_bandwidth", "flops", "nvlink", "scaleout", "gpus_per_node", "efficiency"}
        assert figures <= set(entry["sources"]), name
    assert load_catalog()["B200"].hbm_bytes == 180e9


# -- the time model's attention counts -------------------------------------------------------------------


@pytest.mark.parametrize("context,new,window", [(0, 1, 16), (5, 40, 16), (16, 16, 16), (1000, 3000, 1024),
                                                (8191, 2, 8192), (0, 700, 256), (8192, 2048, 8192), (300, 1, 256)])
def test_attended_keys_are_the_keys_of_the_engines_masks(context: int, new: int, window: int) -> None:
    """The time model prices the rectangle of queries × keys the engine's masks span (it computes masked pairs
    too): the same keys as `attention.causal_masks` gives the chunked-local and the global layers."""
    positions = torch.arange(context, context + new)
    global_mask, _, chunked_mask = causal_masks(positions, context + new, window, key_block=1 << 30)
    assert global_mask is not None
    assert attended_keys(context, new, None) == global_mask.shape[1]
    assert attended_keys(context, new, window) == chunked_mask.shape[1]
    assert chunked_mask.shape[0] == global_mask.shape[0] == new


# -- the simulation follows the engine's own schedule --------------------------------------------------


class OneSecondSteps:
    """A clock for the simulation in which every step's fastest run lasts one second: without a calibrated spread,
    token times are step numbers."""

    def __init__(self, efficiency: Efficiency = Efficiency()) -> None:
        link = Link(1e9, 0.0)
        self.hw = Hardware("clock", 1e9, 1e9, {"fp32": 1e9}, link, link, 1, efficiency=efficiency)

    def seconds(self, rows: list[object]) -> float:
        return 1.0


def test_a_steps_spread_is_drawn_from_calibrated_steps_of_about_its_length() -> None:
    # a short point (1 ms, its repeats up to 0.2 ms over it) and a long one (100 ms, up to 20 ms over)
    efficiency = Efficiency(step_excess=[[0.001, 0.0, 0.0001, 0.0002], [0.1, 0.0, 0.02]])
    spread = StepSpread(efficiency, seed=3)
    short = [spread.draw(0.0012) for _ in range(200)]
    long = [spread.draw(0.08) for _ in range(200)]
    assert 0 <= min(short) and max(short) <= 0.0002 and max(short) > 0.00015
    assert 0 <= min(long) and max(long) <= 0.02 and sum(long) / len(long) == pytest.approx(0.01, rel=0.2)
    assert max(spread.draw(10.0) for _ in range(50)) > 0.01  # beyond every point: the nearest one's
    again = StepSpread(efficiency, seed=3)
    assert [again.draw(0.0012) for _ in range(200)] == short  # seeded: a plan is reproducible
    assert {StepSpread(Efficiency(step_jitter_s=0.004)).draw(t) for t in (0.001, 1.0)} == {0.004}  # an old profile
    # a disaggregated replica on a time-shared host draws from the steps timed inside such a replica
    both = Efficiency(step_excess=[[1.0, 0.0]], replica_step_excess=[[1.0, 0.5]])
    assert StepSpread(both, replica=True).draw(1.0) == 0.5 and StepSpread(both).draw(1.0) == 0.0
    assert StepSpread(Efficiency(step_excess=[[1.0, 0.0]]), replica=True).draw(1.0) == 0.0  # none timed there
    # its prefill group draws from every prefill step timed there, whatever their price and its own
    prefill = Efficiency(step_excess=[[0.01, 0.0]], replica_step_excess=[[0.01, 0.0]],
                         replica_prefill_excess=[[0.02, 0.003], [0.05, 0.001], [0.5, 0.002]])
    drawn = {round(StepSpread(prefill, seed=s, replica=True, prefill=True).draw(0.01), 6) for s in range(40)}
    assert min(drawn) >= 0.001 and max(drawn) <= 0.003 and len(drawn) > 10
    assert StepSpread(prefill, replica=True).draw(0.01) == 0.0  # its decode group: the window, as before
    assert StepSpread(prefill, prefill=True).draw(0.01) == 0.0  # not a replica: calibration's steps alone
    older = Efficiency(step_excess=[[0.01, 0.0]], replica_step_excess=[[0.01, 0.004]])  # a profile from before
    assert StepSpread(older, replica=True, prefill=True).draw(0.01) == 0.004  # its prefill steps: by price
    for bad in ([[0.0, 0.1]], [[0.01, -0.001]], [[]]):  # a point is its fastest (> 0), then excesses (>= 0)
        with pytest.raises(InvalidRequestError, match="step_excess"):
            Efficiency(step_excess=bad)
        with pytest.raises(InvalidRequestError, match="replica_prefill_excess"):
            Efficiency(replica_prefill_excess=bad)


def test_a_decode_batch_is_timed_inside_a_disaggregated_replica_on_ray() -> None:
    """Calibration runs a real replica (prefill group on Ray, decode group here, streams ending and arriving) and
    keeps its decode steps of all 8 streams, priced against the same batch's fastest step alone, and its prefill
    group's steps, priced with the exports its ranks ran before them; Ray is shut down after."""
    import ray

    lines: list[str] = []
    points, prefill_steps = replica_points(1, quick=True, progress=lines.append)
    if (os.cpu_count() or 1) < 2:
        assert points == prefill_steps == []
        return
    assert len(points) == len(lines) == 1 and not ray.is_initialized()
    (point,) = points
    assert point.rows == [Row(1, 128 + 1 + 8)] * 8 and point.label.endswith("in a disaggregated replica")
    assert len(point.times) >= 20 and point.seconds > 0 and all(t > 0 for t in point.times)
    assert step_excess(points) == [[point.seconds, *(max(0.0, t - point.seconds) for t in point.times)]]
    # Timed over REPLICA_WINDOWS windows: the calmest (lowest median decode step) is what it keeps.
    medians = [float(m) for m in re.search(r"windows of ([0-9., ]+)\)", lines[0]).group(1).split(", ")]
    assert len(medians) == REPLICA_WINDOWS and f"median {min(medians):.2f} ms" in lines[0]
    assert f"median {statistics.median(point.times) * 1e3:.2f} ms" in lines[0]
    # The prefill group's steps: the 4k prompts' 512-token chunks and the streams' 128-token prompts, each step
    # as long as its ranks took, with the KV exports they ran first (the streams' prompts are handed over).
    assert len(prefill_steps) >= 10 and all(step.seconds > 0 for step in prefill_steps)
    chunks = {(row.new_tokens, row.context) for step in prefill_steps for row in step.rows}
    assert {(512, 0), (512, 512), (128, 0)} <= chunks and sum(step.exports for step in prefill_steps) >= 8
    model = moe_llama4(*REPLICA_MODEL)
    link = Link(1e9, 1e-4)
    priced_by = Hardware("here", 8e9, 20e9, {"fp32": 50e9}, link, link, 2, time_shared=True,
                         efficiency=Efficiency(overlap="sum", group_call_s=1e-3, kv_export_s=2e-3))
    excess = replica_prefill_excess(prefill_steps, model, priced_by)
    step, (price, over) = prefill_steps[0], excess[0]
    expected = StepTimeModel(model, priced_by, Precision("fp32", "fp32"), Group("prefill", 1, 1)).seconds(
        step.rows) + step.exports * 2e-3
    assert price == pytest.approx(expected) and over == pytest.approx(max(0.0, step.seconds - expected))


def test_the_simulations_tpot_tail_is_made_of_the_calibrated_slow_steps() -> None:
    # Three of four repeats ran at their fastest, one a full second slower: interpolated between them, a third
    # of the steps run slower, by up to a second. One request decoding alone: its gaps are its steps.
    clock = OneSecondSteps(Efficiency(step_excess=[[1.0, 0.0, 0.0, 0.0, 1.0]]))
    result = Simulation(OpenLoop([Request("r", 0.0, 16, 400)])).run_colocated(
        SimEngine.build(clock, 64, 16, 4, 64))  # type: ignore[arg-type]
    gaps = sorted(result.gaps())
    assert gaps[len(gaps) // 2] == pytest.approx(1.0)  # the median step: its fastest
    assert 1.85 < gaps[int(len(gaps) * 0.99)] <= 2.0  # the p99: nearly the slowest repeat
    assert 0.25 < sum(g > 1.0 for g in gaps) / len(gaps) < 0.42


def test_simulation_reproduces_the_engines_schedule_step_for_step() -> None:
    """Same requests through the real engine (counting its steps) and through the simulation: every token comes
    out at the same step, through chunked prefill, a full batch and preemption (few blocks)."""
    config = EngineConfig(block_size=16, num_kv_blocks=14, max_num_seqs=3, max_num_batched_tokens=32,
                          enable_prefix_caching=False)
    model = dense_llama(64, 2, 128, vocab=512)
    engine = random_engine(model, config)
    rng = random.Random(3)
    requests = [Request(f"r{i}", 0.0, rng.randrange(2, 90), rng.randrange(1, 20)) for i in range(7)]
    for r in requests:
        engine.add_request(r.request_id, [rng.randrange(3, 500) for _ in range(r.prompt_tokens)],
                           SamplingParams(max_tokens=r.output_tokens, ignore_eos=True))
    real: dict[str, list[float]] = {r.request_id: [] for r in requests}
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            real[out.request_id] += [float(step)] * len(out.new_token_ids)
    sim_engine = SimEngine.build(OneSecondSteps(), 14, 16, 3, 32)  # type: ignore[arg-type]
    result = Simulation(OpenLoop(requests)).run_colocated(sim_engine)
    assert result.preemptions > 0
    assert {r.request.request_id: r.token_times for r in result.records} == real
    assert sim_engine.block_manager.num_free_blocks == 14


def test_disaggregated_simulation_hands_every_request_over() -> None:
    model = OneSecondSteps()
    prefill = SimEngine.build(model, 64, 16, 8, 64)  # type: ignore[arg-type]
    decoders = [SimEngine.build(model, 32, 16, 8, 64) for _ in range(2)]  # type: ignore[arg-type]
    requests = [Request(f"r{i}", i * 0.5, 40 + i, 5) for i in range(10)]
    result = Simulation(OpenLoop(requests)).run_disaggregated(prefill, decoders, lambda n: (0.25, 0.5))
    assert all(r.finished and r.failed is None for r in result.records)
    assert all(r.token_times[1] - r.token_times[0] >= 1.0 for r in result.records)  # the handoff lies between
    assert prefill.block_manager.num_free_blocks == 64
    assert all(d.block_manager.num_free_blocks == 32 for d in decoders)


def test_a_disaggregated_simulation_parks_what_the_decode_blocks_cannot_take_yet() -> None:
    """As the engine (`DisaggregatedEngine._hand_over_parked`): decode blocks for two sequences at a time, ten
    arriving together, and every one finishes, each waiting in the prefill group's blocks for its turn; a
    prompt no decode group could ever hold fails with the reason."""
    model = OneSecondSteps()
    prefill = SimEngine.build(model, 64, 16, 8, 64)  # type: ignore[arg-type]
    decoders = [SimEngine.build(model, 8, 16, 8, 64)]  # type: ignore[arg-type]
    requests = [Request(f"r{i}", 0.0, 40 + i, 5) for i in range(10)]  # 3-4 blocks each with their output
    result = Simulation(OpenLoop(requests)).run_disaggregated(prefill, decoders, lambda n: (0.0, 0.0))
    assert all(r.finished and r.failed is None for r in result.records)
    decoding = [(r.token_times[1], r.token_times[-1]) for r in result.records]  # first to last decode step
    assert max(sum(a <= start <= b for a, b in decoding) for start, _ in decoding) == 2  # never 3 at once
    assert prefill.block_manager.num_free_blocks == 64 and decoders[0].block_manager.num_free_blocks == 8

    prefill = SimEngine.build(model, 64, 16, 8, 256)  # type: ignore[arg-type]
    decoders = [SimEngine.build(model, 8, 16, 8, 64)]  # type: ignore[arg-type]
    result = Simulation(OpenLoop([Request("big", 0.0, 200, 5)])).run_disaggregated(prefill, decoders,
                                                                                    lambda n: (0.0, 0.0))
    assert result.records[0].failed == "no decode group has KV blocks for it"
    assert prefill.block_manager.num_free_blocks == 64


def _disaggregated_token_times(requests: list[Request], export_s: float = 0.0, fetch_s: float = 0.0,
                               send_s: float = 0.0) -> dict[str, list[float]]:
    prefill = SimEngine.build(OneSecondSteps(), 64, 16, 8, 64)  # type: ignore[arg-type]
    decoders = [SimEngine.build(OneSecondSteps(), 32, 16, 8, 64)]  # type: ignore[arg-type]
    costs = Efficiency(kv_export_s=export_s, kv_fetch_s=fetch_s, group_send_s=send_s)
    result = Simulation(OpenLoop(requests)).run_disaggregated(prefill, decoders, lambda n: (0.0, 0.0), costs=costs)
    return {r.request.request_id: r.token_times for r in result.records}


def test_a_prompt_prefilled_over_several_steps_with_nothing_else_to_do_is_finished() -> None:
    # The scheduler splits the 64-token budget between the two prompts: both need a second prefill step, while
    # nothing decodes and nothing else waits (the loop once stopped there, every request unfinished).
    times = _disaggregated_token_times([Request(f"r{i}", 0.0, 40, 3) for i in range(2)])
    assert times == {"r0": [2.0, 3.0, 4.0], "r1": [2.0, 3.0, 4.0]}


def test_a_handoffs_export_holds_the_prefill_group_its_fetch_and_a_steps_send_the_decode_loop() -> None:
    requests = [Request("r0", 0.0, 40, 3), Request("r1", 0.0, 40, 3), Request("late", 2.5, 16, 2)]
    base = _disaggregated_token_times(requests)
    exported = _disaggregated_token_times(requests, export_s=10.0)
    fetched = _disaggregated_token_times(requests, export_s=0.0, fetch_s=10.0)
    assert base["late"][0] == 4.0  # arrives during the first decode step, prefilled in the next
    # Both exports (10 s each, one after the other) run on the prefill group before its next step: the late
    # prompt's, and each KV lands only once its own export is done.
    assert exported["late"][0] == 2.0 + 10 + 10 + 1
    assert exported["r0"][1] == 2.0 + 10 + 1 and exported["r1"][1] == 2.0 + 20 + 1
    # The fetches are the loop's own time: both before the next decode step, and the loop sends no prefill step
    # meanwhile (the late prompt waits for them too).
    assert fetched["r0"][0] == base["r0"][0]
    assert fetched["r0"][1] == fetched["r1"][1] == 2.0 + 10 + 10 + 1
    assert fetched["late"][0] > fetched["r0"][1]
    # Sending each prefill step (and reading its result) is the loop's time too: the two steps of r0 and r1.
    sent = _disaggregated_token_times(requests, send_s=10.0)
    assert sent["r0"][0] == sent["r1"][0] == base["r0"][0] + 2 * 10


# -- the search --------------------------------------------------------------------------------------


def ask(model: str = "scout", hardware: str = "H200", budget: int = 8, ttft: float | None = 5.0,
        tpot: float | None = 0.2, context: int = 4096, weights: str = "bf16") -> Ask:
    name, config = resolve_model(model)
    workload = Workload(LengthDist.parse("uniform:256:1024"), LengthDist.parse("32"), rate=2.0, num_requests=24)
    return Ask(config, name, resolve_hardware(hardware), Precision(weights, "bf16"), workload, SLO(ttft, tpot), budget,
               context, disaggregated=False)


def test_long_prompts_at_a_low_rate_finish_on_every_disaggregated_layout() -> None:
    """A prompt of 100k tokens alone in a prefill group takes many chunks while nothing decodes: the simulation
    once stopped there, and every disaggregated layout of such an ask was rejected for requests that "did not
    finish" (Scout on H200, 200k-token prompts: TTFT p50 87-104 s shown, all refused; now 7-17 s, all finished)."""
    name, config = resolve_model("scout")
    workload = Workload(LengthDist.parse("100000"), LengthDist.parse("16"), rate=0.02, num_requests=3)
    plan = search(Ask(config, name, resolve_hardware("H200"), Precision("bf16", "bf16"), workload, SLO(None, None),
                      8, 131072))
    disaggregated = [c for c in plan.candidates if c.layout.is_disaggregated and c.result is not None]
    assert disaggregated
    for candidate in disaggregated:
        assert candidate.figures["failed_requests"] == 0, (candidate.layout, candidate.failure)
        assert all(r.finished for r in candidate.result.records)


def test_a_feasible_ask_gets_the_best_layout_a_front_and_reasons() -> None:
    plan = search(ask())
    assert plan.best is not None and plan.best.layout.gpus <= 8
    best_goodput = plan.best.figures["goodput_per_gpu"]
    assert all(c.figures["goodput_per_gpu"] <= best_goodput for c in plan.candidates if c.meets)
    assert plan.pareto and all(c.figures for c in plan.pareto)
    failed = [c for c in plan.candidates if not c.meets]
    assert failed and all(c.failure for c in failed)
    assert any(c.failure.startswith("memory:") for c in failed)  # tp1 cannot hold Scout's 216 GB
    text = report.table(plan)
    assert "BEST" in text and "longest context" in text


def test_an_impossible_budget_says_memory_fails_first_and_how_many_gpus_would_do() -> None:
    plan = search(ask("maverick", "H100-SXM", budget=4))
    assert plan.best is None and plan.impossible is not None
    assert plan.impossible["fails_first"] == "memory"
    assert str(plan.impossible["reason"]).startswith("memory: both group tp4 needs")  # the largest in the budget
    assert plan.impossible["gpus_needed"] == 16  # 801 GB of bf16 weights: more than 8 x 72 GB usable
    assert "NO LAYOUT" in report.table(plan)


def test_where_nothing_fits_the_gpus_named_meet_the_slos_too() -> None:
    """The GPUs that would hold the model are simulated as well: 16 H100s hold Maverick, but no number of them
    reaches a TPOT of 10 us, so the plan names none rather than 16."""
    plan = search(ask("maverick", "H100-SXM", budget=4, tpot=1e-5))
    assert plan.impossible["fails_first"] == "memory" and plan.impossible["gpus_needed"] is None
    assert "more replicas do not help" in report.table(plan)


def test_an_unreachable_tpot_says_which_slo_fails_and_that_more_gpus_do_not_help() -> None:
    plan = search(ask(tpot=1e-5, budget=4))
    assert plan.best is None
    assert plan.impossible["fails_first"] == "tpot"
    assert plan.impossible["gpus_needed"] is None
    assert "more replicas do not help" in report.table(plan)


# -- helm values -------------------------------------------------------------------------------------

# The chart's own schema (Helm checks values against it too: tests/helm renders the planner's values).
VALUES_SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "helm/garrison/values.schema.json").read_text())


def test_helm_values_of_the_best_layout_match_the_chart_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "values.yaml"
    code = main(["plan", "--model", "scout", "--hardware", "H200", "--rate", "2", "--prompt-tokens", "512",
                 "--output-tokens", "16", "--num-requests", "12", "--ttft-slo", "5", "--gpus", "4",
                 "--no-disaggregation", "--helm-values", str(out), "--source", "scout-fp8", "--json"])
    assert code == 0
    values = yaml.safe_load(out.read_text())
    jsonschema.validate(values, VALUES_SCHEMA)
    printed = json.loads(capsys.readouterr().out)
    model = values["models"][0]
    assert (model["name"], model["source"]) == ("llama4-scout", "scout-fp8")
    assert [g["tp"] * g["ep"] for g in model["groups"]] == [printed["best"]["gpus"] // model["replicas"]]
    assert model["engine"]["kv_cache_bytes"] == int(printed["best"]["memory_per_gpu"]["both"]["kv_cache"])


def test_an_impossible_ask_with_helm_values_still_shows_the_plan_and_writes_no_file(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "values.yaml"
    code = main(["plan", "--model", "maverick", "--hardware", "H100-SXM", "--rate", "2", "--ttft-slo", "5",
                 "--gpus", "4", "--plots", str(tmp_path / "plots"), "--helm-values", str(out)])
    printed = capsys.readouterr()
    assert code == 1 and not out.exists()
    assert "NO LAYOUT of at most 4 GPUs" in printed.out and "GPUs that would meet it" in printed.out
    assert "no Helm values written" in printed.err and "no ttft.png" in printed.err  # nothing fits in 4 GPUs
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["memory.png", "pareto.png"]


def test_disaggregated_values_name_both_roles() -> None:
    the_ask = ask()
    candidate = evaluate(the_ask, Layout.disaggregated((4, 1), (2, 2), num_decode=2))
    assert candidate.figures and candidate.layout.gpus == 4 + 2 * 4
    values = helm_values.values(Plan(the_ask, [candidate], candidate, [candidate]), "scout")
    jsonschema.validate(values, VALUES_SCHEMA)
    model = values["models"][0]
    assert [(g["role"], g["tp"], g["ep"]) for g in model["groups"]] == [("prefill", 4, 1), ("decode", 2, 2),
                                                                         ("decode", 2, 2)]
    assert model["gpusPerPod"] == 4 and model["numOfHosts"] == 1


# -- what users see ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["plan", "memory", "--model", "llama-9000", "--hardware", "H200"], "unknown model 'llama-9000'"),
    (["plan", "memory", "--model", "scout", "--hardware", "TPUv9"], "unknown hardware 'TPUv9': choose one of"),
    (["plan", "memory", "--model", "scout", "--hardware", "H200", "--gpus", "3"], "no tp × ep layout of exactly 3"),
    (["plan", "--model", "scout", "--hardware", "H200", "--ttft-slo", "1"], "exactly one of --rate"),
    (["plan", "--model", "scout", "--hardware", "H200", "--rate", "1"], "give at least one SLO"),
    (["plan", "--model", "scout", "--hardware", "H200", "--rate", "1", "--ttft-slo", "1", "--weight-dtype", "fp6"],
     "unknown weight dtype 'fp6'"),
    (["plan", "--model", "scout", "--hardware", "H200", "--rate", "1", "--ttft-slo", "1", "--prompt-tokens",
      "uniform:9:3"], "invalid length distribution"),
])
def test_bad_input_gets_a_clear_message(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("garrison: error: ") and message in captured.err
    assert "Traceback" not in captured.err


def test_an_empty_trace_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trace = tmp_path / "empty.jsonl"
    trace.write_text("\n")
    assert main(["plan", "--model", "scout", "--hardware", "H200", "--trace", str(trace), "--ttft-slo", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("garrison: error: the trace") and "is empty" in err
    with pytest.raises(InvalidRequestError, match="is empty"):
        load_trace(trace)
    trace.write_text('{"arrival_s": 0, "prompt_tokens": 10}\n')
    with pytest.raises(InvalidRequestError, match=r"empty.jsonl:1: not a trace record"):
        load_trace(trace)


def test_a_trace_is_read_in_arrival_order(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 5.0, "prompt_tokens": 10, "output_tokens": 2, "tenant": "b"}\n'
                     '{"timestamp": 3.5, "prompt_tokens": 20, "output_tokens": 4, "tenant": "a"}\n')
    requests = load_trace(trace)
    assert [(r.arrival_s, r.prompt_tokens, r.tenant) for r in requests] == [(0.0, 20, "a"), (1.5, 10, "b")]


def test_memory_table_shows_the_longest_context(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "memory", "--model", "maverick", "--hardware", "H100-SXM", "--weight-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "tp8" in out and "LONGEST CONTEXT" in out


def test_plots_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from garrison.planner import plots

    plan = search(ask(budget=4))
    paths = plots.write_all(plan, tmp_path)
    assert sorted(p.name for p in paths) == ["memory.png", "pareto.png", "ttft.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in paths)


# -- calibration's fit ----------------------------------------------------------------------------------


def test_a_measured_gemm_curve_prices_each_gemm_at_its_rows() -> None:
    efficiency = Efficiency(overlap="sum", gemm_curve={4: 0.3, 1: 0.1})
    assert list(efficiency.gemm_curve) == [1, 4]
    # a profile read back from JSON names its rows as strings: ordered as numbers all the same
    assert list(Efficiency(gemm_curve={"16": 0.3, "128": 0.5, "2": 0.1}).gemm_curve) == [2, 16, 128]
    # linear in log2(rows) between points; below the first the time stays (share ~ rows); flat past the last
    assert [efficiency.curve_share(r) for r in (0.5, 1, 2, 4, 8)] == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])
    link = Link(1e9, 1e-4)
    hardware = Hardware("here", 8e9, 20e9, {"fp32": 50e9}, link, link, 2, efficiency=efficiency, time_shared=True)
    model = dense_llama(64, 2, 128, vocab=512)  # 2 heads of 32 and 2 KV heads: q, k, v, o are 64 x 64 each
    cost = StepTimeModel(model, hardware, Precision("fp32", "fp32"), Group("both", 1, 1), on_ray=False
                         ).cost([Row(1, 10), Row(1, 20)])
    params = 2 * (4 * 64 * 64 + 3 * 64 * 128) + 512 * 64  # two layers' attention and MLP, the logits
    assert cost.gemm_flops_s == pytest.approx(2 * 2 * params / 50e9 / 0.2)  # 2 rows: the share at 2
    # the padded decode batch: both rows read the longest row's 21 keys (context + the new token), K and V, 2 heads,
    # 2 layers
    kv_bytes = (21 + 21) * 2 * 2 * 32 * 4 * 2
    assert cost.stream_bytes_s == pytest.approx(kv_bytes / 20e9)  # weights' reads are in the curve's rate
    assert cost.decode_pairs == 2 * 21 * 2 * 2 and cost.attention_pairs == 0
    assert cost.segments == 0  # two decode rows join the padded decode batch
    mixed = StepTimeModel(model, hardware, Precision("fp32", "fp32"), Group("both", 1, 1), on_ray=False,
                          key_block=1024).cost([Row(1, 10), Row(64, 0), Row(1, 2000)])
    assert mixed.segments == 2 * 2  # a prompt's chunk and a decode past the key block: own attention calls, 2 layers
    # only the decode past the key block is attended blockwise: its 2001 keys in 2 blocks of 1024, on both layers
    assert mixed.key_blocks == 2 * 2 and mixed.blockwise_pairs == 2001 * 2 * 2
    # own steps are kept by kind: decode rows only, prefill segments within a key block, any past one
    within = StepTimeModel(model, hardware, Precision("fp32", "fp32"), Group("both", 1, 1), on_ray=False,
                           key_block=1024).cost([Row(1, 10), Row(512, 512)])
    assert (step_kind(cost), step_kind(within), step_kind(mixed)) == ("decode", "prefill", "blockwise")
    with pytest.raises(InvalidRequestError, match="gemm_curve"):
        Efficiency(gemm_curve={0: 0.1})
    with pytest.raises(InvalidRequestError, match=r"efficiency: kv_export_s=-1.0: times .* must be >= 0$"):
        Efficiency(kv_export_s=-1.0)  # the field named, not the whole profile


def test_nnls_recovers_non_negative_coefficients() -> None:
    rng = random.Random(0)
    truth = [2.0, 0.0, 0.5]
    rows = [[rng.uniform(0, 1), rng.uniform(0, 1), 1.0] for _ in range(30)]
    targets = [sum(a * b for a, b in zip(row, truth)) for row in rows]
    got = nnls(rows, targets, [1.0] * len(rows))
    assert got == pytest.approx(truth, abs=1e-9)
    assert all(c >= 0 for c in nnls(rows, [-t for t in targets], [1.0] * len(rows)))


@pytest.mark.parametrize("seed", [17, 20, 75, 80])
def test_nnls_finds_the_best_non_negative_fit(seed: int) -> None:
    """Against every subset of free coefficients solved by plain least squares (the optimum is one of them), on
    features that move together as a step's do (six columns mixed from three latent ones): on these seeds,
    zeroing an unconstrained fit's negative coefficients leaves 1.1-2.8 times the optimum's residual."""
    import itertools

    import torch

    rng = random.Random(seed)
    mix = [[rng.uniform(0, 1) for _ in range(6)] for _ in range(3)]
    latent = [[rng.uniform(0, 1) for _ in range(3)] for _ in range(30)]
    rows = [[sum(v[k] * mix[k][j] for k in range(3)) + 0.05 * rng.uniform(0, 1) for j in range(6)] for v in latent]
    truth = [rng.uniform(-1, 1) for _ in range(6)]
    targets = [sum(c * v for c, v in zip(truth, row)) for row in rows]
    weights = [1.0] * len(rows)
    a, b = torch.tensor(rows, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)

    def residual(x: list[float]) -> float:
        return float(((a @ torch.tensor(x, dtype=torch.float64)) - b).square().sum())

    best = math.inf
    for size in range(7):
        for subset in itertools.combinations(range(6), size):
            x = [0.0] * 6
            if subset:
                solved = torch.linalg.lstsq(a[:, list(subset)], b[:, None]).solution.flatten().tolist()
                if min(solved) < 0:
                    continue
                for j, value in zip(subset, solved):
                    x[j] = value
            best = min(best, residual(x))
    got = nnls(rows, targets, weights)
    assert min(got) >= 0
    assert residual(got) == pytest.approx(best, rel=1e-6)


def test_layouts_are_checked() -> None:
    _, scout = resolve_model("scout")
    with pytest.raises(GarrisonError, match="tp=3 does not divide"):
        Layout.colocated(3).validate(scout, 8)
    with pytest.raises(GarrisonError, match="must fill whole nodes"):
        Layout.colocated(4, 3).validate(scout, 8)
    layout = Layout.disaggregated((2, 1), (4, 2), num_decode=2, replicas=3)
    assert layout.gpus == 3 * (2 + 16)
    assert layout.nodes(8) == 7  # six nodes of one decode group each, the three prefill groups on a seventh


def test_a_config_json_is_a_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from garrison_workers.config import tiny_llama4

    (tmp_path / "config.json").write_text(json.dumps(tiny_llama4(max_position_embeddings=65536)))
    assert main(["plan", "memory", "--model", str(tmp_path), "--hardware", "H100-SXM", "--gpus", "1", "--json"]) == 0
    layouts = json.loads(capsys.readouterr().out)["layouts"]
    assert [row["layout"] for row in layouts] == ["tp1"]
    assert layouts[0]["max_context"] == 65536  # a few MB of model: the model's own context is the limit


def test_a_fitted_profile_plans_like_a_catalog_entry(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Calibration's fit on real engine steps (a tiny model here; `garrison plan calibrate` measures more) gives a
    profile that explains those steps and that --hardware takes like a catalog name."""
    config = dense_llama(64, 2, 128, vocab=512)
    engine = random_engine(config, EngineConfig(num_kv_blocks=200, max_num_batched_tokens=256,
                                                enable_prefix_caching=False))
    link = Link(1e9, 1e-4)
    measured = Efficiency(overlap="sum", gemm_curve={1: 0.05, 16: 0.3})  # as `gemm_curve` measures it
    base = Hardware("here", 8e9, 20e9, {"fp32": 50e9}, link, link, 2, efficiency=measured, time_shared=True)
    for attempt in range(2):  # a second measurement when a burst of other work (Ray starting workers) hit the first
        points = [decode_point(engine, config, batch, 32, 3) for batch in (1, 4, 16)]
        points += prefill_points(engine, config, 768, 256, repeats=1)
        efficiency, fitted = fit(points, base)
        errors = sorted(abs(p["fitted_s"] / p["measured_s"] - 1) for p in fitted)
        if errors[len(errors) // 2] < 0.5:
            break
    assert efficiency.calibrated and efficiency.overlap == "sum"
    # every repeat's excess over its point's fastest, kept per point for the simulation to draw from
    repeated = [p for p in points if len(p.times) > 1]
    assert len(repeated) == 3 and all(p.seconds == min(p.times) for p in points)
    assert efficiency.step_excess == [[p.seconds, *(t - p.seconds for t in p.times)] for p in repeated]
    pooled = [x for point in efficiency.step_excess for x in point[1:]]
    assert min(pooled) == 0 and min(pooled) <= efficiency.step_jitter_s <= max(pooled)
    scale = efficiency.gemm_curve[16] / 0.3  # the fit's scale of the bare GEMMs, kept in the curve
    assert efficiency.gemm_curve == pytest.approx({1: 0.05 * scale, 16: 0.3 * scale})
    assert errors[len(errors) // 2] < 0.5  # the median step explained within 50%, even on a busy machine
    profile = tmp_path / "here.yaml"
    hardware = replace(base, efficiency=efficiency)
    save_profile(hardware, profile, {"fit": fitted})
    assert resolve_hardware(str(profile)) == hardware
    assert main(["plan", "--model", str(_tiny_config(tmp_path)), "--hardware", str(profile), "--concurrency", "4",
                 "--prompt-tokens", "64", "--output-tokens", "8", "--num-requests", "8", "--tpot-slo", "10",
                 "--gpus", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["calibrated"] and plan["best"] is not None


def test_a_models_own_steps_price_its_steps_where_the_fit_misses_them() -> None:
    model, other = dense_llama(64, 2, 128, vocab=512), dense_llama(64, 4, 128, vocab=512)
    key = model_key(model)
    assert key.startswith("llama h64 L2 ") and key != model_key(other)
    assert model_key(replace(model, rope_theta=1e6, eos_token_ids=(7,))) == key  # what a step computes, no more
    # its decode steps: the fit priced 1 ms where 1.5 ran, and 4 ms where 5 ran
    eff = Efficiency(own_steps={key: {"decode": [[0.004, 0.005], [0.001, 0.0015]]}})
    assert eff.own_steps[key]["decode"] == [[0.001, 0.0015], [0.004, 0.005]]  # in order of the fit's price
    assert eff.own_ratio(key, "decode", 0.0005) == 1.5  # shorter than any: the shortest's ratio
    assert eff.own_ratio(key, "decode", 0.002) == pytest.approx(1.375)  # halfway in log(s): 1.5 to 1.25
    assert eff.own_ratio(key, "decode", 0.004) == 1.25
    assert eff.own_ratio(key, "decode", 0.008) == pytest.approx(1.125)  # longer: the 1 ms the longest took over
    assert eff.own_ratio(key, "prefill", 0.002) == eff.own_ratio("llama h1 L1 0", "decode", 0.002) == 1.0
    # Four or more steps of a kind: above the longest, the rest of the fit's growth at the slope they show. Chunks
    # the fit priced 10-40 ms ran 0.5 ms + 0.8x that (least squares: slope 0.8), so a step priced 100 ms takes the
    # longest's 32.5 ms and 0.8 of the 60 ms more; 3 steps are too few, and the seconds are carried.
    chunks = [[f, 0.0005 + 0.8 * f] for f in (0.01, 0.02, 0.03, 0.04)]
    sloped = Efficiency(own_steps={key: {"blockwise": chunks, "prefill": chunks[:3]}})
    assert sloped.own_ratio(key, "blockwise", 0.1) * 0.1 == pytest.approx(0.0325 + 0.8 * 0.06)
    assert sloped.own_ratio(key, "prefill", 0.1) * 0.1 == pytest.approx(0.0245 + 0.07)
    # a steep slope from a few noisy steps is held to 1.5x the fit's growth
    steep = Efficiency(own_steps={key: {"prefill": [[f, 3 * f] for f in (0.01, 0.02, 0.03, 0.04)]}})
    assert steep.own_ratio(key, "prefill", 0.1) * 0.1 == pytest.approx(0.12 + 1.5 * 0.06)
    # a model timed without blockwise steps (or a profile from before they were kept apart): its prefill steps
    assert steep.own_ratio(key, "blockwise", 0.1) == steep.own_ratio(key, "prefill", 0.1)
    for bad in ({key: {"mixed": [[0.001, 0.001]]}}, {key: {"decode": [[0.001]]}}, {key: {"decode": [[0.0, 1.0]]}}):
        with pytest.raises(InvalidRequestError, match="own_steps"):
            Efficiency(own_steps=bad)
    # In a plan: the rank's part of this model's decode steps takes the ratio; collectives (EP's all-to-alls),
    # other models and prefill steps keep the fit's price.
    moe = moe_llama4(64, 4, 512)
    link = Link(1e9, 1e-3)
    plain = Hardware("here", 8e9, 20e9, {"fp32": 50e9}, link, link, 8, efficiency=Efficiency(overlap="sum"))
    decode, prefill = [Row(1, 100)] * 4, [Row(64, 0)]
    fp32 = Precision("fp32", "fp32")
    ep2 = StepTimeModel(moe, plain, fp32, Group("both", 1, 2))
    comm = ep2.cost(decode).comm_s
    rank = ep2.seconds(decode) - comm
    assert comm > 0.005  # 5 collectives per MoE layer at 1 ms each
    own = replace(plain, efficiency=Efficiency(overlap="sum",
                                               own_steps={model_key(moe): {"decode": [[rank, 2 * rank]]}}))
    assert StepTimeModel(moe, own, fp32, Group("both", 1, 2)).seconds(decode) == pytest.approx(2 * rank + comm)
    for m, rows in ((other, decode), (moe, prefill)):
        assert StepTimeModel(m, own, fp32, Group("both", 1, 1)).seconds(rows) == StepTimeModel(
            m, plain, fp32, Group("both", 1, 1)).seconds(rows)


def test_calibrating_with_a_models_own_steps_plans_them_as_they_ran(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """`plan calibrate --model`'s steps on a real checkpoint: beside the fit, they price that model's own steps at
    what they measured, round-trip through the profile, and the plan says it used them."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_random_checkpoint(moe_llama4_raw(64, 4, 512), model_dir)
    lines: list[str] = []
    points = model_points(model_dir, threads=1, quick=True, progress=lines.append)
    config = points[0].model
    assert lines == [f"  {model_key(config)}: its own steps"]
    assert {p.label.split(" ", 3)[3] for p in points} >= {"decode batch 1 context 128", "decode batch 8 context 128",
                                                          "prefill 512 at 0", "prefill 512 at 512"}
    link = Link(1e9, 1e-4)
    base = Hardware("here", 8e9, 20e9, {"fp32": 50e9}, link, link, 2, time_shared=True,
                    efficiency=Efficiency(overlap="sum", gemm_curve={1: 0.05, 16: 0.3}))
    efficiency, _ = fit(points, base)
    table = own_steps(points, replace(base, efficiency=efficiency))
    assert set(table) == {model_key(config)} and set(table[model_key(config)]) == {"decode", "prefill"}
    hardware = replace(base, efficiency=replace(efficiency, own_steps=table))
    prices = [fitted for kind in table[model_key(config)].values() for fitted, _ in kind]
    checked = 0
    for point in points:
        def priced(hw: Hardware) -> float:
            return StepTimeModel(config, hw, Precision("fp32", "fp32"), Group("both", 1, 1), on_ray=False,
                                 key_block=point.key_block).seconds(point.rows)

        if prices.count(priced(replace(base, efficiency=efficiency))) == 1:  # steps alike share the first's ratio
            assert priced(hardware) == pytest.approx(point.seconds, rel=1e-9)
            checked += 1
    assert checked >= len(points) - 2
    profile = tmp_path / "here.yaml"
    save_profile(hardware, profile, {})
    assert resolve_hardware(str(profile)) == hardware
    ask = ["--hardware", str(profile), "--concurrency", "2", "--prompt-tokens", "64", "--output-tokens", "4",
           "--num-requests", "4", "--tpot-slo", "10", "--gpus", "1", "--json"]
    assert main(["plan", "--model", str(model_dir), *ask]) == 0
    assert json.loads(capsys.readouterr().out)["own_steps"] is True
    assert main(["plan", "--model", str(_tiny_config(tmp_path)), *ask]) == 0
    assert json.loads(capsys.readouterr().out)["own_steps"] is False
    # a model that is not there is refused before the minutes of a calibration
    assert main(["plan", "calibrate", "--out", str(tmp_path / "p.yaml"), "--model", "no-such-model"]) == 1
    assert "no model named 'no-such-model'" in capsys.readouterr().err and not (tmp_path / "p.yaml").exists()


def test_a_random_checkpoint_loads_as_the_model_calibration_steps_in_memory(tmp_path: Path) -> None:
    """The checkpoint that calibration's Ray ranks load holds the same random model its in-memory engines run: the
    engine loaded from the files generates the same tokens."""
    raw = moe_llama4_raw(64, 4, 512)
    save_random_checkpoint(raw, tmp_path)
    config = EngineConfig(num_kv_blocks=64, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    from garrison_workers.engine.llm_engine import LLMEngine

    loaded = LLMEngine.from_path(tmp_path, config).generate([[3, 4, 5, 6, 7]], params)
    in_memory = random_engine(moe_llama4(64, 4, 512), config).generate([[3, 4, 5, 6, 7]], params)
    assert loaded[0].token_ids == in_memory[0].token_ids and len(loaded[0].token_ids) == 6


def test_ep_steps_of_two_models_give_the_ranks_stretch_and_the_collectives_cost() -> None:
    """Hand-made steps of the two EP models: alone, 1.3x and 0.8x what the fit gives them; at ep=2 and ep=4 their
    compute as it ran alone stretched 1.8x and 1.1x (beyond 4 ranks sharing 2 cores), plus 0.3 ms and 1.2 ms for
    each of the step's collectives (5 per MoE layer: growing faster than the ranks, as on this machine). The fit
    gives back both; priced with them, each step comes back as measured. Steps that would need ranks at once to run
    faster than alone give a stretch of 1, not below; one model alone gives no link (calibration keeps the idle
    processes' figure). A link whose 2-rank collective would cost less than nothing is refused."""
    fp32 = Precision("fp32", "fp32")
    models = [moe_llama4(*spec) for spec in EP_MODELS]
    base = Hardware("here", 8e9, 20e9, {"fp32": 50e9}, Link(1e9, 0.0), Link(1e9, 0.0), 2,
                    efficiency=Efficiency(overlap="sum", layer_overhead_s=1e-4, step_overhead_s=2e-4),
                    time_shared=True)
    rows = [Row(1, 136)] * 8
    alone = [Point(f"alone {i}", model, rows, ratio * StepTimeModel(model, base, fp32, Group("both", 1, 1),
                                                                     on_ray=False).seconds(rows))
             for i, (model, ratio) in enumerate(zip(models, (1.3, 0.8)))]
    as_alone = replace(base, efficiency=replace(base.efficiency, own_steps=own_steps(alone, base)))

    def steps(stretch: dict[int, float], per_call: dict[int, float]) -> EPSteps:
        points = {}
        for ep in (2, 4):
            points[ep] = []
            for model in models:
                step = StepTimeModel(model, as_alone, fp32, Group("both", 1, ep))
                compute, rest = step.parts(step.cost(rows))
                calls = 5 * sum(1 for i in range(model.num_layers) if model.is_moe_layer(i))
                points[ep].append(Point(f"ep={ep}", model, rows, stretch[ep] * compute + rest + calls * per_call[ep]))
        return EPSteps(alone, points)

    link, stretch, measured = ep_link(steps({2: 1.8, 4: 1.1}, {2: 3e-4, 4: 1.2e-3}), base, 1e9)
    assert stretch == {2: pytest.approx(1.8), 4: pytest.approx(1.1)}
    assert link.latency(2) == pytest.approx(3e-4) and link.latency(4) == pytest.approx(1.2e-3)
    assert link.latency(1) == 0.0 and link.latency(8) == pytest.approx(3e-4 + 6 * 4.5e-4)
    assert measured["ep4"]["per_collective_s"] == pytest.approx(1.2e-3) and len(measured["ep2"]["steps"]) == 2
    fitted = replace(as_alone, nvlink=link, scaleout=link,
                     efficiency=replace(as_alone.efficiency, rank_stretch=stretch))
    for ep, points in steps({2: 1.8, 4: 1.1}, {2: 3e-4, 4: 1.2e-3}).points.items():
        for point in points:
            priced = StepTimeModel(point.model, fitted, fp32, Group("both", 1, ep)).seconds(rows)
            assert priced == pytest.approx(point.seconds)
    _, stretch, _ = ep_link(steps({2: 0.5, 4: 0.6}, {2: 3e-4, 4: 9e-4}), base, 1e9)
    assert stretch == {2: 1.0, 4: 1.0}
    one_model = {ep: points[:1] for ep, points in steps({2: 1.8, 4: 1.1}, {2: 3e-4, 4: 1.2e-3}).points.items()}
    assert ep_link(EPSteps(alone[:1], one_model), base, 1e9) is None
    with pytest.raises(InvalidRequestError, match="invalid link"):
        Link(1e9, -2e-4, 1e-4)


def test_ep_steps_of_several_models_are_timed_in_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model's engine at a group size takes its steps in rounds, one model after the other, so that a slow
    spell of the machine reaches them alike; each model's point keeps every round's steps and the fastest. The
    caller's models follow calibration's, and `split` parts them again."""
    directories = []
    for hidden in (64, 96):
        directories.append(tmp_path / f"moe-{hidden}")
        directories[-1].mkdir()
        save_random_checkpoint(moe_llama4_raw(hidden, 4, 512), directories[-1])
    order: list[int] = []

    def timed(engine: Any, config: Any, *args: Any) -> Point:
        order.append(config.hidden_size)
        return decode_point(engine, config, *args)

    monkeypatch.setattr(calibrate, "decode_point", timed)
    config = EngineConfig(num_kv_blocks=256, max_num_batched_tokens=512, enable_prefix_caching=False)
    points = calibrate._ep_rounds(directories, config, 1, True, lambda line: None)
    assert order == [64, 96, 64, 96]  # two rounds (quick), the models in turn
    assert [p.model.hidden_size for p in points] == [64, 96]
    for point in points:
        assert len(point.times) == 6 and point.seconds == min(point.times) and point.label.endswith(" ep=1")
        assert point.rows == [Row(1, 128 + 1 + 1)] * 8
    steps = EPSteps(points, {2: points[::-1]})
    ours, theirs = steps.split(1)
    assert ours.alone == points[:1] and ours.points == {2: points[1:]}
    assert theirs.alone == points[1:] and theirs.points == {2: points[:1]}


def test_ranks_at_once_stretch_a_time_shared_groups_compute_and_not_its_collectives() -> None:
    """Per group size (2 and 4 ranks); a size between takes the one below, one rank none. The EP step's compute
    grows by the stretch, its collectives do not."""
    eff = Efficiency(overlap="sum", layer_overhead_s=1e-4, rank_stretch={"4": 1.2, "2": 1.5})
    assert [eff.stretch(n) for n in (1, 2, 3, 4, 8)] == [1.0, 1.5, 1.5, 1.2, 1.2]
    for bad in ({1: 1.2}, {2: 0.9}):
        with pytest.raises(InvalidRequestError, match="rank_stretch"):
            Efficiency(rank_stretch=bad)
    model = moe_llama4(*EP_MODELS[0])
    plain = Hardware("here", 8e9, 20e9, {"fp32": 50e9}, Link(1e9, 1e-3), Link(1e9, 1e-3), 2,
                     efficiency=Efficiency(overlap="sum", layer_overhead_s=1e-4), time_shared=True)
    stretched = replace(plain, efficiency=eff)
    rows = [Row(1, 136)] * 8
    for ep, factor in ((2, 1.5), (4, 1.2)):
        before = StepTimeModel(model, plain, Precision("fp32", "fp32"), Group("both", 1, ep))
        after = StepTimeModel(model, stretched, Precision("fp32", "fp32"), Group("both", 1, ep))
        comm = before.cost(rows).comm_s
        assert comm > 0 and after.cost(rows).comm_s == comm
        assert after.seconds(rows) - comm == pytest.approx(factor * (before.seconds(rows) - comm))


def _tiny_config(directory: Path) -> Path:
    from garrison_workers.config import tiny_llama4

    (directory / "config.json").write_text(json.dumps(tiny_llama4()))
    return directory
