"""`garrison plan`: how many GPUs, laid out how, for a model, a hardware type, a workload and SLOs.

`garrison plan calibrate` measures this machine with the real engine and writes a profile that `--hardware`
takes like a catalog name; `garrison plan memory` prints the memory per GPU and the longest context of each
layout of a number of GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from garrison_workers.errors import InvalidRequestError, LayoutError
from tqdm import tqdm

from garrison.cli.output import HelpFormatter
from garrison.cli.store_options import add_kek_options, add_store_option, provider_from_args, store_from_args
from garrison.planner import helm_values, report
from garrison.planner.hardware import resolve_hardware
from garrison.planner.layout import Layout
from garrison.planner.memory import EngineLimits, Precision, breakdown
from garrison.planner.models import PRESETS, resolve_model
from garrison.planner.search import Ask, group_shapes, search
from garrison.planner.workload import SLO, LengthDist, Workload, load_trace


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "plan", help="capacity planner: the layout, GPUs and nodes for a model, hardware, workload and SLOs",
        description="Search the layouts (tp, ep, prefill and decode groups, replicas) within a GPU budget, simulate "
                    "each with the engine's own scheduler, and print the best by goodput per GPU, the Pareto front "
                    "and why the others fail. Subcommands: `calibrate` (measure this machine), `memory` (memory "
                    "and longest context per layout).",
        formatter_class=HelpFormatter)
    _model_options(parser)
    load = parser.add_argument_group("workload (one of --rate, --concurrency, --trace)")
    load.add_argument("--rate", type=float, help="requests per second across the deployment (Poisson arrivals)")
    load.add_argument("--concurrency", type=int, help="users across the deployment, each awaiting its answer")
    load.add_argument("--trace", type=Path, help="JSONL: arrival_s, prompt_tokens, output_tokens, tenant per line")
    load.add_argument("--prompt-tokens", default="2048", help="N, uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA")
    load.add_argument("--output-tokens", default="256", help="N, uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA")
    load.add_argument("--num-requests", type=int, default=300, help="requests simulated per layout")
    load.add_argument("--seed", type=int, default=0,
                      help="of the simulated arrivals and lengths (same seed, same plan)")
    slo = parser.add_argument_group("SLOs and budget")
    slo.add_argument("--ttft-slo", type=float, help="time to first token, seconds")
    slo.add_argument("--tpot-slo", type=float, help="time per output token (a request's mean), seconds")
    slo.add_argument("--slo-percentile", type=float, default=99.0,
                     help="the percentile of TTFT and TPOT that must meet the SLOs")
    slo.add_argument("--gpus", type=int, required=False, help="GPU budget (default: one node)")
    slo.add_argument("--max-context", type=int, help="longest context to support (default: the workload's)")
    slo.add_argument("--imbalance", type=float, default=1.2,
                     help="busiest EP rank's routed tokens over the mean (expert-load imbalance)")
    slo.add_argument("--no-disaggregation", action="store_true", help="only colocated layouts")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    out.add_argument("--plots", type=Path, help="write pareto.png, memory.png and ttft.png into this directory")
    out.add_argument("--helm-values", type=Path, help="write the best layout as a values file for the Helm chart")
    out.add_argument("--source", help="with --helm-values: the model the workers load (a store name or a path; "
                                      "default: --model)")
    parser.set_defaults(run=run)
    sub = parser.add_subparsers(dest="plan_command", metavar="SUBCOMMAND")
    memory = sub.add_parser("memory", help="memory per GPU and longest context of each layout of --gpus GPUs",
                            formatter_class=HelpFormatter)
    _model_options(memory)
    memory.add_argument("--gpus", type=int, help="GPUs per layout (default: one node)")
    memory.add_argument("--json", action="store_true")
    memory.set_defaults(run=run_memory)
    calibrate = sub.add_parser("calibrate", help="measure this machine with the real engine and write a profile",
                               formatter_class=HelpFormatter)
    calibrate.add_argument("--out", type=Path, required=True, help="profile file to write (YAML)")
    calibrate.add_argument("--threads", type=int, default=1, help="torch threads of one rank (one 'GPU' here)")
    calibrate.add_argument("--quick", action="store_true", help="fewer points (a smoke test, less accurate)")
    calibrate.add_argument("--model", action="append", default=[], metavar="MODEL",
                           help="also time this model's own steps (a path, a bundled name or a model of the store; "
                                "repeatable): plans for it then price its steps from them rather than from the fit "
                                "alone, which misses any one model's steps by 10-40%% on a CPU")
    add_store_option(calibrate)
    add_kek_options(calibrate, title="key-encryption key, for a --model of the store")
    calibrate.set_defaults(run=run_calibrate)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}), a config.json or model directory, or a "
                                        "model of the store")
    parser.add_argument("--hardware", help="a catalog name (H100-SXM, H200, B200) or a profile from `plan calibrate`")
    parser.add_argument("--catalog", type=Path, help="hardware catalog YAML (default: the one shipped)")
    add_store_option(parser)
    add_kek_options(parser, title="key-encryption key, for a model of the store (its config is encrypted)")
    parser.add_argument("--weight-dtype", default="bf16", help="bf16, fp8, int8, int4, q4_0, q4_1, q8_0 or fp32")
    parser.add_argument("--kv-dtype", default="bf16", help="bf16, fp8 or fp32")
    parser.add_argument("--kv-layout", choices=("hybrid", "uniform"), default="hybrid",
                        help="hybrid: Llama 4's chunked layers keep one chunk per sequence; uniform: every layer "
                             "keeps every token (Garrison's block manager today)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="engine: sequences per step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="engine: tokens per step")


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise InvalidRequestError(f"`garrison plan` needs {' and '.join(missing)}")


def _basics(args: argparse.Namespace) -> tuple[str, Any, Any, Precision, EngineLimits]:
    _require(args, "model", "hardware")
    name, model = resolve_model(args.model, store_from_args(args), provider_from_args(args))
    hardware = resolve_hardware(args.hardware, args.catalog)
    precision = Precision(args.weight_dtype, args.kv_dtype)
    if args.max_num_seqs < 1 or args.max_num_batched_tokens < 1:
        raise InvalidRequestError("--max-num-seqs and --max-num-batched-tokens must be >= 1")
    limits = EngineLimits(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    return name, model, hardware, precision, limits


def _workload(args: argparse.Namespace) -> Workload:
    given = [x is not None for x in (args.rate, args.concurrency, args.trace)]
    if sum(given) != 1:
        raise InvalidRequestError("give the workload as exactly one of --rate, --concurrency or --trace")
    trace = load_trace(args.trace) if args.trace else ()
    return Workload(LengthDist.parse(args.prompt_tokens), LengthDist.parse(args.output_tokens), args.rate,
                    args.concurrency, trace, args.num_requests, args.seed)


def build_ask(args: argparse.Namespace) -> Ask:
    name, model, hardware, precision, limits = _basics(args)
    workload = _workload(args)
    if args.ttft_slo is None and args.tpot_slo is None:
        raise InvalidRequestError("give at least one SLO: --ttft-slo SECONDS and/or --tpot-slo SECONDS")
    budget = args.gpus if args.gpus is not None else hardware.gpus_per_node
    if budget < 1:
        raise InvalidRequestError(f"the GPU budget must be >= 1, got {budget}")
    longest_output = max((r.output_tokens for r in workload.trace), default=0) or workload.output.high
    context = args.max_context or workload.longest_prompt + longest_output
    return Ask(model, name, hardware, precision, workload, SLO(args.ttft_slo, args.tpot_slo, args.slo_percentile),
               budget, context, args.kv_layout, limits, limits, args.imbalance, not args.no_disaggregation)


def _progress_bar(layouts: list[Layout]) -> Iterable[Layout]:
    """On a terminal only: stderr carries nothing else a script would read, but a log needs no bar."""
    return tqdm(layouts, desc="simulating layouts", unit="layout", file=sys.stderr, disable=None, leave=False)


def run(args: argparse.Namespace) -> int:
    plan = search(build_ask(args), _progress_bar)
    if args.plots is not None:
        from garrison.planner import plots

        if "ttft.png" not in {path.name for path in plots.write_all(plan, args.plots)}:
            print(f"garrison: no ttft.png in {args.plots}: no layout within the budget fits in memory, so there is "
                  "no TTFT curve to draw", file=sys.stderr)
    if args.json:
        json.dump(report.to_json(plan), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(report.table(plan))
    if args.helm_values is not None:  # after the plan, so a refusal still shows what the budget would need
        if plan.best is None:
            raise InvalidRequestError(f"no Helm values written to {args.helm_values}: no layout within the budget "
                                      "meets the ask (the plan above says what would)")
        values = helm_values.values(plan, args.source or args.model)
        args.helm_values.write_text(yaml.safe_dump(values, sort_keys=False))
    return 0


def run_memory(args: argparse.Namespace) -> int:
    name, model, hardware, precision, limits = _basics(args)
    gpus = args.gpus or hardware.gpus_per_node
    rows = []
    for tp, ep in group_shapes(model, hardware, gpus):
        if tp * ep != gpus:
            continue
        mem = breakdown(model, hardware, precision, tp, ep, limits, args.kv_layout)
        rows.append({"layout": Layout.colocated(tp, ep).describe(), **mem.to_dict()})
    if not rows:
        raise LayoutError(f"no tp × ep layout of exactly {gpus} GPUs fits {name}; try a power of two up to "
                          f"{hardware.gpus_per_node} or whole nodes")
    if args.json:
        json.dump({"model": name, "hardware": hardware.name, "gpus": gpus, "layouts": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{name} on {gpus} × {hardware.name}: weights {precision.weights}, KV {precision.kv} ({args.kv_layout})")
    print(f"{'LAYOUT':<10}{'WEIGHTS GB':>12}{'ACTIV GB':>10}{'KV GB':>9}{'LONGEST CONTEXT':>18}")
    for r in rows:
        context = f"{r['max_context']:,}" if r["kv_cache"] > 0 else "does not fit"
        print(f"{r['layout']:<10}{r['weights'] / 1e9:>12.1f}{r['activations'] / 1e9:>10.1f}"
              f"{max(0.0, r['kv_cache']) / 1e9:>9.1f}{context:>18}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from garrison.model_refs import resolve_model as resolve_location
    from garrison.planner.calibrate import calibrate, model_points

    # Refused before the minutes a calibration takes, not after.
    if args.threads < 1:
        raise InvalidRequestError(f"--threads must be >= 1, got {args.threads}")
    if args.out.is_dir() or not args.out.parent.is_dir():
        raise InvalidRequestError(f"--out {args.out}: give a file to write, in a folder that exists")
    store, provider = (store_from_args(args), provider_from_args(args)) if args.model else (None, None)
    locations = [resolve_location(ref, store, provider) for ref in args.model]
    own = [point for location in locations for point in model_points(location, args.threads, args.quick, print)]
    hardware = calibrate(args.out, threads=args.threads, quick=args.quick, progress=print, extra_points=own)
    eff = hardware.efficiency
    print(f"wrote {args.out}: {hardware.name}; GEMM {hardware.flops['fp32'] / 1e9:.1f} GFLOP/s peak, memory "
          f"{hardware.hbm_bandwidth / 1e9:.1f} GB/s; step overhead {eff.step_overhead_s * 1e3:.2f} ms, per layer "
          f"{eff.layer_overhead_s * 1e6:.0f} µs")
    for key, kinds in eff.own_steps.items():
        ratios = [measured / fitted for steps in kinds.values() for fitted, measured in steps]
        print(f"  {key}: {len(ratios)} own steps, measured {min(ratios):.2f}-{max(ratios):.2f}x the fit")
    return 0
