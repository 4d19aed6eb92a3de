"""Hardware the planner knows: the catalog (`catalog.yaml`, each figure with its source) and measured profiles.

A profile written by `garrison plan calibrate` has the same fields as a catalog entry; its efficiencies and
overheads were fitted to this machine's own engine runs. A catalog GPU's efficiencies are defaults until a
profile measured on that GPU replaces them: every plan says which kind it used.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from garrison_workers.errors import InvalidRequestError

CATALOG_FILE = Path(__file__).with_name("catalog.yaml")
STEP_KINDS = {"decode", "prefill", "blockwise"}  # `step_time.step_kind`
# Own steps of one kind a slope is drawn from (`Efficiency.own_ratio`): three or fewer are too few to tell a model's
# growth from one noisy step. The slope stays within OWN_SLOPE_BOUNDS of the fit's for the same reason.
OWN_SLOPE_STEPS = 4
OWN_SLOPE_BOUNDS = (0.5, 1.5)


@dataclass(slots=True, frozen=True)
class Link:
    """A fabric between ranks: bandwidth per GPU and direction, and a fixed cost per collective call
    (`latency_s` + `latency_per_rank_s` per rank beyond the first)."""

    bandwidth: float  # bytes/s
    # A collective has 2 ranks at least: `latency_s` is the line through the costs at 2 and more ranks taken back to
    # one, and may be below 0 where the cost grows faster than in proportion to the ranks (calibrated on a CPU, 4
    # ranks sharing 2 cores: 0.4-0.7 ms a collective at 2 ranks, 2.1-3.0 at 4). Held at 0 there, it had priced 2
    # ranks at up to 2.3x what they were measured to pay.
    latency_s: float
    latency_per_rank_s: float = 0.0
    efficiency: float = 1.0  # of `bandwidth` a collective's payload reaches

    def __post_init__(self) -> None:
        if (self.bandwidth <= 0 or self.latency(2) < 0 or self.latency_per_rank_s < 0
                or not 0 < self.efficiency <= 1):
            raise InvalidRequestError(f"invalid link {self}: need bandwidth > 0, latencies >= 0 from 2 ranks, "
                                      "0 < efficiency <= 1")

    def latency(self, ranks: int) -> float:
        return self.latency_s + self.latency_per_rank_s * (ranks - 1) if ranks > 1 else 0.0


@dataclass(slots=True, frozen=True)
class Efficiency:
    """How close the engine's steps come to the peaks, and what they cost besides FLOPs and bytes.

    `overlap` says how compute and memory traffic of one operation combine: "max" (they overlap, a GPU's
    roofline) or "sum" (they do not, as on a CPU running small operations)."""

    gemm: float = 0.7  # of peak FLOPS, for GEMMs of many tokens (of the `gemm_curve` rate, where there is one)
    gemm_small: float = 0.5  # of peak FLOPS, for GEMMs of fewer than SMALL_GEMM_TOKENS tokens (decode batches)
    # Measured (a calibrated profile): GEMM rows -> share of peak FLOPS that a GEMM of that many rows reached with
    # its weights streamed from memory. Where present it prices every GEMM at its own row count (weights' bytes
    # included), in place of the two shares above and the roofline: a decode batch of 32 runs a GEMM far more
    # efficiently than one of 8, which a single small-GEMM share cannot say.
    gemm_curve: dict[int, float] = field(default_factory=dict)
    memory: float = 0.8  # of HBM bandwidth, for streaming weights and KV
    attention: float = 0.5  # of peak FLOPS, for attention's QK^T and PV
    attention_pair_s: float = 0.0  # per (query, key, head) pair of a prefill segment beyond its FLOPs (softmax)
    # per (query, key, head) pair of the padded decode batch (one query per sequence, keys gathered or read where
    # they lie: another kernel, whose cost per key the prefill's does not tell)
    decode_pair_s: float = 0.0
    # per pair of a global layer over a context longer than the engine's attention key block, which Garrison
    # attends block by block (online softmax, one key block per iteration) instead of in one fused kernel
    blockwise_pair_s: float = 0.0
    # per blockwise pair whose score tile (query rows × key block, fp32) does not fit `Hardware.cache_bytes`
    spill_pair_s: float = 0.0
    key_block_s: float = 0.0  # per iteration of that blockwise path (a key block of one segment on one layer)
    overlap: str = "max"
    step_overhead_s: float = 0.0  # per engine step: scheduling, metadata, sampling
    layer_overhead_s: float = 0.0  # per layer and step: kernel launches, framework dispatch
    row_overhead_s: float = 0.0  # per sequence in a step: its block table, masks, slots
    # per prefill segment (a row of more than one token, or past a key block) and layer: its own attention call
    segment_overhead_s: float = 0.0
    expert_overhead_s: float = 0.0  # per routed expert a rank runs in a step (grouping, dispatch)
    group_call_s: float = 0.0  # per step of a disaggregated replica's group on Ray (remote call and result)
    # the driver's own time in that round trip (sending the call, reading the result): the disaggregated loop can
    # do nothing else meanwhile, so a prefill step sent costs the decode steps this much
    group_send_s: float = 0.0
    # per check, without waiting, whether a Ray call is done: a disaggregated replica checks its prefill step (and
    # each KV export still running) once per decode step
    poll_s: float = 0.0
    # per KV handoff, the prefill group's time to write a sequence's KV out (a call on its ranks, between its
    # steps: the next step waits for it), besides the bytes
    kv_export_s: float = 0.0
    # per KV handoff, what the decode side's loop spends on it besides copying the bytes in: starting the export,
    # fetching the handles and the payload, releasing them
    kv_fetch_s: float = 0.0
    # what a typical step (the median) takes over the fastest, which the fit prices, pooled over every repeated
    # step; the simulation adds it to each step where calibration kept no `step_excess`
    step_jitter_s: float = 0.0
    # Per measured point: its fastest step (seconds), then what each of its repeats took over that. Short steps
    # and long ones spread differently (a stall of a few milliseconds doubles a decode step, and hides within a
    # long prefill's own repeats), so the simulation draws a step's excess from the points of about its length.
    step_excess: list[list[float]] = field(default_factory=list)
    # The same for a decode group's steps timed inside a disaggregated replica on this host (a calibrated,
    # time-shared one: its prefill group computing and KV moving on the same cores), for such replicas' steps.
    replica_step_excess: list[list[float]] = field(default_factory=list)
    # Per step of that replica's prefill group (on Ray): its price, then what it took over that. A replica's
    # prefill step draws from all of them, whatever its price (`simulate.StepSpread`).
    replica_prefill_excess: list[list[float]] = field(default_factory=list)
    # Models whose own steps calibration timed (`garrison plan calibrate --model`), by `models.model_key`: per
    # kind of step (`step_time.step_kind`: "decode", one-token rows only; "prefill", any prefill segment;
    # "blockwise", one attending past a key block), [fitted, measured] seconds of each. The fit is one set of
    # efficiencies for every model it saw, and misses any one model's steps by 10-40% either way on a CPU; a plan
    # for a model measured here prices its steps through these (`own_ratio`).
    own_steps: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    # A time-shared host (a calibrated CPU): ranks stepping at once -> how much longer a rank's compute takes
    # than alone, beyond sharing the devices (ranks / devices), fitted to the engine's EP steps of two models
    # (`calibrate.ep_link`). Priced as collectives instead, it left a model with more compute than calibration's
    # short by the stretch of its extra compute.
    rank_stretch: dict[int, float] = field(default_factory=dict)
    calibrated: bool = False

    def __post_init__(self) -> None:
        # Sorted by rows as numbers: a profile read back from JSON has its rows as strings ("128" < "16").
        object.__setattr__(self, "gemm_curve", dict(sorted((int(k), float(v)) for k, v in self.gemm_curve.items())))
        object.__setattr__(self, "rank_stretch", dict(sorted((int(k), float(v)) for k, v in self.rank_stretch.items())))
        if any(ranks < 2 or not stretch >= 1 for ranks, stretch in self.rank_stretch.items()):
            raise InvalidRequestError(f"invalid rank_stretch {self.rank_stretch}: ranks >= 2 -> a factor >= 1")
        shares = (self.gemm, self.gemm_small, self.memory, self.attention)
        if not all(0 < s <= 1 for s in shares) or self.overlap not in ("max", "sum"):
            raise InvalidRequestError(f"invalid efficiency {self}: shares must be in (0, 1], overlap max or sum")
        if any(int(rows) < 1 or not share > 0 for rows, share in self.gemm_curve.items()):
            raise InvalidRequestError(f"invalid gemm_curve {self.gemm_curve}: rows >= 1 -> a share of peak > 0")
        for name in ("step_excess", "replica_step_excess", "replica_prefill_excess"):
            points = getattr(self, name)
            if any(not point or point[0] <= 0 or min(point) < 0 for point in points):
                raise InvalidRequestError(f"invalid {name}: each point is its fastest step (> 0 s), then excesses "
                                          "(>= 0 s)")
            object.__setattr__(self, name, [[float(x) for x in point] for point in points])
        for key, kinds in self.own_steps.items():
            if not set(kinds) <= STEP_KINDS or any(len(p) != 2 or min(p) <= 0 for steps in kinds.values()
                                                   for p in steps):
                raise InvalidRequestError(f"invalid own_steps of {key!r}: kinds {sorted(STEP_KINDS)}, each a list "
                                          "of [fitted, measured] seconds (> 0)")
        object.__setattr__(self, "own_steps", {key: {kind: sorted([float(x) for x in p] for p in steps)
                                                     for kind, steps in kinds.items()}
                                               for key, kinds in self.own_steps.items()})
        negative = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                    if f.name.endswith("_s") and getattr(self, f.name) < 0]
        if negative:
            raise InvalidRequestError(f"invalid efficiency: {', '.join(negative)}: times (the fields ending in _s) "
                                      f"must be >= 0")

    def own_ratio(self, key: str, kind: str, fitted_s: float) -> float:
        """Measured over fitted time of model `key`'s own steps of `kind` at a step the fit prices at `fitted_s`:
        linear in log(seconds) between its measured steps, the shortest one's below them. Above the longest, the
        step takes what the longest took plus the rest of the fit's growth at the slope the model's own steps
        show (measured on fitted seconds, least squares over the kind's steps; with fewer than OWN_SLOPE_STEPS of
        them, slope 1: the seconds the longest took beyond the fit are carried), so a chunk over 64k tokens is
        priced from chunks up to 8k by how this model's steps grew there. Carrying the ratio instead had put a
        model's miss at 2k where it did not hold at 64k; carrying the seconds kept the fit's slope, which priced
        disagg.py's long prompts high, the more so the longer (its blockwise chunks grew 0.77-1.12x as fast as the
        fit over twenty-two runs; the figures, and what each way gave, in ops/docs/planner/README.md). A
        "blockwise" step of a model with none of its own is priced by its "prefill" steps. 1 for a model or kind
        not measured."""
        kinds = self.own_steps.get(key, {})
        steps = kinds.get(kind) or (kinds.get("prefill") if kind == "blockwise" else None)
        if not steps:
            return 1.0
        (first, first_measured), (last, last_measured) = steps[0], steps[-1]
        if fitted_s <= first:
            return first_measured / first
        if fitted_s >= last:
            return (last_measured + _own_slope(steps) * (fitted_s - last)) / fitted_s
        for (low, low_measured), (high, high_measured) in zip(steps, steps[1:]):
            if fitted_s <= high and high > low:
                t = math.log(fitted_s / low) / math.log(high / low)
                return low_measured / low + t * (high_measured / high - low_measured / low)
        return last_measured / last

    def stretch(self, ranks: int) -> float:
        """`rank_stretch` at `ranks`: that of the largest group size measured up to it; 1 for one rank."""
        measured = [factor for size, factor in self.rank_stretch.items() if size <= ranks]  # sorted by size
        return measured[-1] if measured else 1.0

    def curve_share(self, rows: float) -> float:
        """`gemm_curve` at `rows`: linear in log2(rows) between measured points; below the first, a GEMM's time
        no longer shrinks (its weights are read all the same), so the share falls with the rows; flat above the
        last."""
        points = list(self.gemm_curve.items())
        first_rows, first_share = points[0]
        if rows <= first_rows:
            return first_share * rows / first_rows
        for (low, low_share), (high, high_share) in zip(points, points[1:]):
            if rows <= high:
                t = math.log2(rows / low) / math.log2(high / low)
                return low_share + t * (high_share - low_share)
        return points[-1][1]


def _own_slope(steps: list[list[float]]) -> float:
    """Measured seconds against fitted seconds over a model's own steps: how much of the fit's growth it shows."""
    if len(steps) < OWN_SLOPE_STEPS:
        return 1.0
    try:
        slope = statistics.linear_regression([f for f, _ in steps], [m for _, m in steps]).slope
    except statistics.StatisticsError:  # every step priced alike: no growth to compare
        return 1.0
    return min(max(slope, OWN_SLOPE_BOUNDS[0]), OWN_SLOPE_BOUNDS[1])


@dataclass(slots=True, frozen=True)
class Hardware:
    name: str
    hbm_bytes: float  # per GPU
    hbm_bandwidth: float  # bytes/s per GPU
    flops: dict[str, float]  # dense peak FLOPS per GPU by compute dtype (bf16, fp8, fp32)
    nvlink: Link  # between GPUs of one node
    scaleout: Link  # between nodes, per GPU
    gpus_per_node: int
    memory_utilization: float = 0.9  # share of HBM the engine may use (the rest: CUDA context, allocator slack)
    runtime_overhead_bytes: float = 0.0  # per GPU besides weights, KV and activations (NCCL buffers, graphs)
    efficiency: Efficiency = field(default_factory=Efficiency)
    # A CPU profile: a group with more ranks than the node has devices shares them (its compute takes
    # ranks / devices as long) instead of spanning nodes.
    time_shared: bool = False
    # Prefill -> decode KV handoff; None: over `nvlink` within a node, `scaleout` across nodes.
    kv_link: Link | None = None
    cache_bytes: float = 0.0  # last-level cache a blockwise attention tile must fit in to stay cheap (0: no limit)
    sources: dict[str, str] = field(default_factory=dict)  # figure -> where it comes from
    description: str = ""

    def __post_init__(self) -> None:
        if self.hbm_bytes <= 0 or self.hbm_bandwidth <= 0 or self.gpus_per_node < 1 or not self.flops:
            raise InvalidRequestError(f"hardware {self.name!r}: hbm_bytes, hbm_bandwidth, flops and gpus_per_node "
                                      "must be positive")
        if not 0 < self.memory_utilization <= 1:
            raise InvalidRequestError(f"hardware {self.name!r}: memory_utilization must be in (0, 1]")

    def peak_flops(self, dtype: str) -> float:
        """Dense peak at `dtype`, else at the widest type the hardware lists (a CPU computes fp8 through fp32)."""
        for candidate in (dtype, "bf16", "fp32"):
            if candidate in self.flops:
                return self.flops[candidate]
        return max(self.flops.values())

    @property
    def usable_bytes(self) -> float:
        return self.hbm_bytes * self.memory_utilization - self.runtime_overhead_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def from_dict(name: str, raw: dict[str, Any]) -> Hardware:
    """A catalog entry or a profile; unknown fields are refused so a typo cannot silently fall back to a default."""
    known = {f.name for f in fields(Hardware)}
    unknown = set(raw) - known
    if unknown:
        raise InvalidRequestError(f"hardware {name!r} has unknown fields {sorted(unknown)}; known: {sorted(known)}")
    try:
        values = dict(raw, name=raw.get("name", name))
        values["nvlink"] = Link(**raw["nvlink"])
        values["scaleout"] = Link(**raw["scaleout"])
        values["efficiency"] = Efficiency(**raw.get("efficiency", {}))
        values["kv_link"] = Link(**raw["kv_link"]) if raw.get("kv_link") else None
        values["flops"] = {k: float(v) for k, v in raw["flops"].items()}
        return Hardware(**values)
    except (KeyError, TypeError) as err:
        raise InvalidRequestError(f"hardware {name!r} is incomplete or malformed: {err}") from None


def load_catalog(path: Path | None = None) -> dict[str, Hardware]:
    raw = _read_yaml(path or CATALOG_FILE)
    entries = raw.get("hardware") if isinstance(raw, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise InvalidRequestError(f"{path or CATALOG_FILE} holds no `hardware:` mapping of entries")
    return {name: from_dict(name, entry) for name, entry in entries.items()}


def load_profile(path: Path) -> Hardware:
    raw = _read_yaml(path)
    if not isinstance(raw, dict) or "hardware" not in raw or not isinstance(raw["hardware"], dict):
        raise InvalidRequestError(f"{path} is not a hardware profile (written by `garrison plan calibrate`)")
    return from_dict(raw["hardware"].get("name", path.stem), raw["hardware"])


def save_profile(hardware: Hardware, path: Path, measurements: dict[str, Any]) -> None:
    body = {"hardware": hardware.to_dict(), "measurements": measurements}
    path.write_text(yaml.safe_dump(body, sort_keys=False))


def resolve_hardware(ref: str, catalog_path: Path | None = None) -> Hardware:
    """A catalog name (case-insensitive), or the path of a profile file."""
    path = Path(ref).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return load_profile(path)
    catalog = load_catalog(catalog_path)
    by_lower = {name.lower(): hw for name, hw in catalog.items()}
    if ref.lower() in by_lower:
        return by_lower[ref.lower()]
    raise InvalidRequestError(f"unknown hardware {ref!r}: choose one of {', '.join(catalog)} from the catalog "
                              f"{catalog_path or CATALOG_FILE}, or pass a profile written by `garrison plan calibrate`")


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise InvalidRequestError(f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise InvalidRequestError(f"{path} is not valid YAML: {err}") from None
