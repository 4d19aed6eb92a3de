"""A discrete-event simulation of one replica that drives Garrison's own Scheduler and BlockManager.

Each engine of the replica is the engine's real `Scheduler` over a real `BlockManager` (prefix caching off: a
planned workload has no shared prefixes); only the step's duration comes from the time model, on a simulated
clock. So TTFT and TPOT percentiles come from the policy the engine runs: continuous batching, chunked prefill
under the token budget, the chunk cap that leaves room for waiting prompts, preemption when blocks run out. A
step lasts its fastest run plus an excess drawn from what calibration's repeated steps of about its length took
over theirs (`StepSpread`): a p99 TPOT is made of the slow steps, not of the typical one.

Colocated: one engine; each step is scheduled, lasts what the time model says, and its tokens appear at its end.

Disaggregated (as `DisaggregatedEngine.step`): a prefill step stays in flight on the prefill group while each
call runs one decode step on every decode group; a prefilled sequence leaves the prefill engine (its blocks
freed), gets blocks on the decode group with the most free blocks, and its KV crosses the link, then is imported
a slice per decode step (each slice about a quarter of a decode step, as the engine paces it) before it decodes.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from garrison_workers.engine.block_manager import BlockManager
from garrison_workers.engine.scheduler import ScheduledBatch, Scheduler
from garrison_workers.engine.sequence import SamplingParams, Sequence, SequenceStatus

from garrison.planner.hardware import Efficiency
from garrison.planner.step_time import Row, StepTimeModel
from garrison.planner.workload import Arrivals, Request

Handoff = Callable[[int], tuple[float, float]]
IMPORT_SHARE = 0.25  # of a decode step spent importing one handover's slice (kv_link.ImportPace's default share)


@dataclass(slots=True)
class Record:
    request: Request
    token_times: list[float] = field(default_factory=list)
    failed: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.request.arrival_s if self.token_times else math.inf

    @property
    def tpot(self) -> float | None:
        """Mean gap between this request's tokens (None with fewer than two)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def finished(self) -> bool:
        return len(self.token_times) >= self.request.output_tokens


@dataclass(slots=True)
class SimResult:
    records: list[Record]
    end_s: float
    steps: int
    preemptions: int = 0
    truncated: bool = False  # stopped at the step or time limit with requests unserved (overloaded)

    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.records if r.failed is None]

    def tpots(self) -> list[float]:
        return [t for r in self.records if r.failed is None and (t := r.tpot) is not None]

    def gaps(self) -> list[float]:
        return [b - a for r in self.records for a, b in itertools.pairwise(r.token_times)]

    @property
    def output_tokens(self) -> int:
        return sum(len(r.token_times) for r in self.records)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.end_s if self.end_s > 0 else 0.0

    @property
    def failures(self) -> list[Record]:
        return [r for r in self.records if r.failed is not None or not r.finished]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    return _quantile(sorted(values), q / 100) if values else math.nan


def _quantile(ordered: list[float], share: float) -> float:
    """`ordered` (sorted, not empty) at `share` in [0, 1], interpolated between closest ranks."""
    position = (len(ordered) - 1) * share
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class StepSpread:
    """What a step takes over its fastest run, drawn (seeded: a plan is reproducible) from what calibration's
    repeated steps of about its length took over theirs: within a factor of 2 of its fastest, else the nearest
    point's. Without such points, every step takes `step_jitter_s` more. `replica`: a disaggregated replica on a
    time-shared host, whose steps spread as calibration's decode steps inside such a replica did; with `prefill`,
    its prefill group's, whose steps take what any of calibration's replica's prefill steps took over its price.
    Not by price: those steps' excess is what the host and Ray add to a rank's call, 0-9 ms at the median of each
    2 ms of price from 12 to 60 ms with no trend at the cheap end, where a window by price holds a few dozen steps
    of a few shapes (in one profile 25-67% of them at zero: shapes the fit prices high). disagg.py's start, whose
    first prefill step is priced 9.4 ms, took 2.4-6 ms over that (medians of 24 starts, seven times); its window
    drew 1.1 ms at the median."""

    WINDOW = 2.0

    def __init__(self, efficiency: Efficiency, seed: int = 0, replica: bool = False, prefill: bool = False) -> None:
        measured = efficiency.replica_step_excess if replica and efficiency.replica_step_excess else \
            efficiency.step_excess
        points = sorted((p[0], p[1:]) for p in measured if len(p) > 1)
        self._fastest = [fastest for fastest, _ in points]
        self._excesses = [excesses for _, excesses in points]
        self._jitter = efficiency.step_jitter_s
        self._rng = random.Random(seed)
        self._pools: dict[int, list[float]] = {}
        self._whole = sorted(x for p in efficiency.replica_prefill_excess for x in p[1:]) if replica and prefill \
            else []  # the one pool of a replica's prefill steps, whatever their price

    def draw(self, fastest: float) -> float:
        if self._whole and fastest > 0:
            return _quantile(self._whole, self._rng.random())
        if not self._fastest or fastest <= 0:
            return self._jitter
        return _quantile(self._pool(fastest), self._rng.random())

    def _pool(self, fastest: float) -> list[float]:
        key = round(math.log2(fastest) * 8)  # an eighth of an octave: steps that close share a pool
        if key not in self._pools:
            at = 2.0 ** (key / 8)
            low = bisect.bisect_left(self._fastest, at / self.WINDOW)
            high = bisect.bisect_right(self._fastest, at * self.WINDOW)
            if low == high:  # none within the window: the nearest point, in ratio
                nearest = min(range(len(self._fastest)), key=lambda i: abs(math.log(self._fastest[i] / at)))
                low, high = nearest, nearest + 1
            self._pools[key] = sorted(x for excesses in self._excesses[low:high] for x in excesses)
        return self._pools[key]


@dataclass(slots=True)
class SimEngine:
    """One engine of the replica: the real scheduler and block manager, and the time model of its group."""

    step_model: StepTimeModel
    scheduler: Scheduler
    spread: StepSpread

    @classmethod
    def build(cls, step_model: StepTimeModel, num_blocks: int, block_size: int, max_num_seqs: int,
              max_num_batched_tokens: int, seed: int = 0, replica: bool = False) -> SimEngine:
        """`seed`: of the steps' spread (give each engine of a replica its own); `replica`: see `StepSpread` (a
        prefill group's steps are its `prefill` ones)."""
        blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        prefill = replica and step_model.group.role == "prefill"
        return cls(step_model, Scheduler(blocks, max_num_seqs, max_num_batched_tokens),
                   StepSpread(step_model.hw.efficiency, seed, replica, prefill))

    @property
    def block_manager(self) -> BlockManager:
        return self.scheduler.block_manager

    def plan(self) -> tuple[ScheduledBatch, float]:
        batch = self.scheduler.schedule()
        rows = [Row(n, seq.num_computed_tokens, seq.num_computed_tokens + n == seq.num_tokens) for seq, n in batch.work]
        if not rows:
            return batch, 0.0
        fastest = self.step_model.seconds(rows)
        return batch, fastest + self.spread.draw(fastest)

    @staticmethod
    def apply(batch: ScheduledBatch) -> list[Sequence]:
        """Advance every scheduled sequence; those whose last known token was computed are sampled."""
        sampled = []
        for seq, count in batch.work:
            if seq.is_finished:
                continue
            seq.num_computed_tokens += count
            if seq.num_computed_tokens == seq.num_tokens:
                sampled.append(seq)
        return sampled


@dataclass(slots=True)
class _Handover:
    seq: Sequence
    decoder: SimEngine
    computed: int
    ready_s: float  # the KV has crossed the link
    import_left_s: float
    fetched: bool = False  # the decode side has fetched the payload (its first slice)


class Simulation:
    def __init__(self, arrivals: Arrivals, max_steps: int = 200_000, max_time_s: float = 36_000.0) -> None:
        self.arrivals, self.max_steps, self.max_time_s = arrivals, max_steps, max_time_s
        self._pending: list[tuple[float, int, Request]] = []
        self._order = itertools.count()
        self.records: dict[str, Record] = {}
        self.now, self.steps, self.preemptions = 0.0, 0, 0
        self._costs = Efficiency()
        self._prefill_free_s = 0.0  # disaggregated: when the prefill group is done with the exports sent to it
        self._push(arrivals.initial())

    # -- requests ---------------------------------------------------------------------------------

    def _push(self, requests: list[Request]) -> None:
        for request in requests:
            heapq.heappush(self._pending, (request.arrival_s, next(self._order), request))

    def _admit(self, engine: SimEngine) -> None:
        while self._pending and self._pending[0][0] <= self.now:
            _, _, request = heapq.heappop(self._pending)
            self.records[request.request_id] = Record(request)
            params = SamplingParams(max_tokens=request.output_tokens, ignore_eos=True)
            engine.scheduler.add(Sequence(request.request_id, [0] * request.prompt_tokens, request.prompt_tokens,
                                          params))

    def _next_arrival(self) -> float:
        return self._pending[0][0] if self._pending else math.inf

    def _token(self, engine: SimEngine, seq: Sequence) -> bool:
        """Record a sampled token at the current time; True if the request is done (its blocks are freed)."""
        seq.token_ids.append(0)
        record = self.records[seq.request_id]
        record.token_times.append(self.now)
        if len(record.token_times) == 1:
            self._push(self.arrivals.on_first_token(record.request, self.now))
        if len(record.token_times) < record.request.output_tokens:
            return False
        engine.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self._push(self.arrivals.on_finish(record.request, self.now))
        return True

    def _refuse_unfittable(self, engine: SimEngine) -> None:
        """A waiting prompt that cannot get blocks while nothing runs never will (the engine refuses it up front)."""
        seq = engine.scheduler.waiting[0]
        engine.scheduler.remove(seq)
        self.records[seq.request_id].failed = (f"needs {engine.block_manager.blocks_needed(seq.num_tokens + 1)} KV "
                                               f"blocks, the engine has {engine.block_manager.num_blocks}")

    def _over(self) -> bool:
        return self.steps >= self.max_steps or self.now >= self.max_time_s

    def _result(self) -> SimResult:
        truncated = self._over() and (bool(self._pending) or any(not r.finished for r in self.records.values()))
        return SimResult(list(self.records.values()), self.now, self.steps, self.preemptions, truncated)

    # -- colocated --------------------------------------------------------------------------------

    def run_colocated(self, engine: SimEngine) -> SimResult:
        while not self.arrivals.done() and not self._over():
            self._admit(engine)
            if not engine.scheduler.has_unfinished():
                if not self._pending:
                    break
                self.now = self._next_arrival()
                continue
            batch, seconds = engine.plan()
            self.preemptions += len(batch.preempted)
            if not batch.work:  # everything running was preempted (retry), or the next prompt can never fit
                if not batch.preempted:
                    self._refuse_unfittable(engine)
                continue
            self.now += seconds
            self.steps += 1
            for seq in engine.apply(batch):
                self._token(engine, seq)
        return self._result()

    # -- disaggregated ----------------------------------------------------------------------------

    def run_disaggregated(self, prefill: SimEngine, decoders: list[SimEngine], handoff: Handoff,
                          decoders_parallel: bool = True, costs: Efficiency = Efficiency()) -> SimResult:
        """`handoff(tokens)`: (seconds for a prompt's KV to cross the link, seconds to import it into the decode
        group's blocks). `decoders_parallel`: decode groups step at the same time (each on its own ranks).
        `costs`: what the replica's loop and its prefill group pay besides steps and bytes: `poll_s` per check of a
        call in flight (the prefill step, each export not yet done), `group_send_s` per prefill step sent,
        `kv_export_s` per handoff on the prefill group (its next step waits), `kv_fetch_s` per handoff on the loop."""
        self._costs = costs
        poll_s, send_s, fetch_s = costs.poll_s, costs.group_send_s, costs.kv_fetch_s
        inflight: tuple[ScheduledBatch, float] | None = None
        handovers: list[_Handover] = []
        parked: list[Sequence] = []  # prefilled, their KV in the prefill group's blocks until a decode group has room
        last_decode_s = 0.0
        while not self.arrivals.done() and not self._over():
            self._admit(prefill)
            self._advance_handovers(handovers, last_decode_s)
            if inflight is not None:
                self.now += poll_s
            if inflight is None:
                batch, seconds = prefill.plan()
                self.preemptions += len(batch.preempted)
                if batch.work:
                    self.now += send_s
                    inflight = (batch, max(self.now, self._prefill_free_s) + seconds)
                elif prefill.scheduler.waiting and not prefill.scheduler.running and not batch.preempted:
                    self._refuse_unfittable(prefill)
                    continue
            decode_s, outputs = self._decode_steps(decoders, decoders_parallel)
            idle = decode_s == 0.0
            last_decode_s = decode_s or last_decode_s
            self._hand_over_parked(prefill, decoders, parked, handovers, handoff)
            if inflight is not None and (inflight[1] <= self.now or (idle and not handovers)):
                self.now = max(self.now, inflight[1])
                outputs += self._finish_prefill(prefill, inflight[0], parked)
                self._hand_over_parked(prefill, decoders, parked, handovers, handoff)
                inflight = None
            if idle and handovers and not outputs:
                oldest = handovers.pop(0)
                self.now = max(self.now, oldest.ready_s) + oldest.import_left_s + (0.0 if oldest.fetched else fetch_s)
                self._complete(oldest)
            elif (idle and inflight is None and not handovers and not parked and not outputs
                  and not prefill.scheduler.has_unfinished()):
                if not self._pending:
                    break
                self.now = max(self.now, self._next_arrival())
        return self._result()

    def _advance_handovers(self, handovers: list[_Handover], last_decode_s: float) -> None:
        """One paced slice of every handover whose KV has arrived; complete those fully imported."""
        spent = 0.0
        for handover in list(handovers):
            if handover.ready_s > self.now:
                spent += self._costs.poll_s
                continue
            piece = min(handover.import_left_s, IMPORT_SHARE * last_decode_s or handover.import_left_s)
            handover.import_left_s -= piece
            spent += piece + (0.0 if handover.fetched else self._costs.kv_fetch_s)
            handover.fetched = True
            if handover.import_left_s <= 1e-12:
                handovers.remove(handover)
                self._complete(handover)
        self.now += spent

    def _complete(self, handover: _Handover) -> None:
        seq, scheduler = handover.seq, handover.decoder.scheduler
        seq.num_computed_tokens = handover.computed
        seq.status = SequenceStatus.RUNNING
        scheduler.running.append(seq)  # as LLMEngine.admit: it decodes from the next step

    def _decode_steps(self, decoders: list[SimEngine], parallel: bool) -> tuple[float, int]:
        planned = [d.plan() for d in decoders]
        times = [seconds for batch, seconds in planned if batch.work]
        for batch, _ in planned:
            self.preemptions += len(batch.preempted)
        outputs = 0
        if not times:
            return 0.0, outputs
        elapsed = max(times) if parallel else sum(times)
        self.now += elapsed
        self.steps += 1
        for decoder, (batch, _) in zip(decoders, planned):
            for seq in decoder.apply(batch):
                self._token(decoder, seq)
                outputs += 1
        return elapsed, outputs

    def _finish_prefill(self, prefill: SimEngine, batch: ScheduledBatch, parked: list[Sequence]) -> int:
        self.steps += 1
        outputs = 0
        for seq in prefill.apply(batch):
            outputs += 1
            if not self._token(prefill, seq):
                prefill.scheduler.running.remove(seq)  # as LLMEngine's prefill role: held for its handoff
                parked.append(seq)
        return outputs

    def _hand_over_parked(self, prefill: SimEngine, decoders: list[SimEngine], parked: list[Sequence],
                          handovers: list[_Handover], handoff: Handoff) -> None:
        """As `DisaggregatedEngine._hand_over_parked`: oldest first, while a decode group has blocks for the next;
        the rest keep their prefill blocks and wait. One no decode group could hold even empty fails."""
        while parked:
            seq, computed = parked[0], parked[0].num_computed_tokens
            decoder = max(decoders, key=lambda d: d.block_manager.num_free_blocks)
            needed = decoder.block_manager.blocks_needed(computed + 1)
            if needed > decoder.block_manager.num_free_blocks:
                if any(d.block_manager.blocks_needed(computed + 1) <= d.block_manager.num_blocks for d in decoders):
                    return  # decode steps will free blocks
                self.records[seq.request_id].failed = "no decode group has KV blocks for it"
                seq.status = SequenceStatus.FINISHED
                prefill.block_manager.free(seq)
                parked.pop(0)
                continue
            parked.pop(0)
            prefill.block_manager.free(seq)
            seq.block_table, seq.num_hashed_blocks, seq.num_computed_tokens = [], 0, 0
            decoder.block_manager.ensure_slots(seq, computed + 1)
            link_s, import_s = handoff(computed)
            # Exports run on the prefill group one after another, before its next step.
            self._prefill_free_s = max(self._prefill_free_s, self.now) + self._costs.kv_export_s
            handovers.append(_Handover(seq, decoder, computed, self._prefill_free_s + link_s, import_s))
