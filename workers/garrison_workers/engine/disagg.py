"""Disaggregated serving: one engine prefills, others decode, and KV caches move between them.

A long prompt then occupies the prefill group while the decode groups keep streaming. Both kinds
of group compute at the same time, and the decode groups never wait for the prefill group: a
prefill step (one chunk of a long prompt can take a second) stays in flight across as many `step()`
calls as it needs, while each call runs one decode step and returns its tokens. Only when no decode
group has work does a call wait for the prefill step. For the overlap, the prefill engine must run
on its own ranks (a Ray group, `on_ray=True` for tp=1); a local one computes inside `begin_step`.
After its prompt is prefilled (and its first token sampled), a sequence's
KV leaves the prefill group, whose blocks are freed at once, for the decode engine with the most
free blocks, through a `kv_link` chosen by `EngineConfig.kv_transport` (Ray's object store, or
torch.distributed point-to-point between Ray worker groups, received in the background). Transfers
run while the decode groups keep stepping: each step moves every transfer on by one bounded piece (a
slice of tokens imported in about a quarter of a decode step) and completes those that are done; the
sequence decodes from the next step. A transfer that fails ends that request with an error; nothing is
decoded from half a cache, and neither side keeps its blocks. An aborted transfer imports no more slices.
A prefilled sequence that no decode group has blocks for yet waits, its KV kept in the prefill group's blocks
(so that group admits fewer prompts meanwhile: the replica's backpressure), and goes over, oldest first, once
decode steps have freed enough: failing it would throw away its prefill, minutes of it for a long prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from garrison_workers.engine.llm_engine import LLMEngine, RequestOutput
from garrison_workers.engine.sequence import SamplingParams, Sequence, SequenceStatus
from garrison_workers.errors import ContextLengthError, GarrisonError, LayoutError, UnavailableError, WorkerLostError
from garrison_workers.kv_link import HandleLink, ImportPace, KVLink, TorchChannel, Transfer
from garrison_workers.kv_transfer import KVTransferError


@dataclass(slots=True)
class _Handover:
    """A sequence whose KV is on its way to `decoder`'s reserved blocks."""

    seq: Sequence
    decoder: LLMEngine
    computed: int
    transfer: Transfer
    block_manager: Any  # the decoder's when reserved: a restarted decoder has a new one, without these blocks
    aborted: bool = False


class DisaggregatedEngine:
    def __init__(self, prefill: LLMEngine, decoders: list[LLMEngine], import_slice_tokens: int | None = None) -> None:
        """`import_slice_tokens`: tokens of KV a decode engine imports per step; None paces them to about a quarter
        of a decode step."""
        if prefill.role != "prefill" or not decoders or any(d.role != "decode" for d in decoders):
            raise ValueError("need one engine with role 'prefill' and at least one with role 'decode'")
        if import_slice_tokens is not None and import_slice_tokens < 1:
            raise ValueError(f"import_slice_tokens must be >= 1, not {import_slice_tokens}")
        self.prefill, self.decoders = prefill, decoders
        self.tokenizer = prefill.tokenizer
        self._paces = {decoder: ImportPace(import_slice_tokens or _first_slice_tokens(decoder),
                                           decoder.config.block_size, fixed=import_slice_tokens is not None)
                       for decoder in decoders}
        self._links = {decoder: _link(prefill, decoder, self._paces[decoder]) for decoder in decoders}
        self._prefill_step: Any = None  # the prefill engine's step in flight, kept across step() calls
        self._handovers: list[_Handover] = []
        self._parked: list[Sequence] = []  # prefilled, waiting for a decode group with blocks for them
        # called after each decode step with its rows (every decode group's) and seconds: what a replica's decode
        # steps take while its prefill group computes and KV moves (metrics, the planner's calibration)
        self.decode_step_observer: Callable[[int, float], None] | None = None

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    salt: bytes = b"") -> None:
        # Refused up front if no decode engine could ever hold it, rather than after a long prefill.
        fits = max(d.max_model_len for d in self.decoders) - 1
        if len(prompt_token_ids) > fits:
            raise ContextLengthError(f"the prompt has {len(prompt_token_ids)} tokens but the decode groups hold at "
                                     f"most {fits} with room to generate; shorten the prompt")
        self.prefill.add_request(request_id, prompt_token_ids, params, salt)

    def abort_request(self, request_id: str) -> bool:
        for handover in self._handovers:  # its blocks are freed when the transfer stops writing into them
            if handover.seq.request_id == request_id and not handover.aborted:
                handover.aborted = True
                handover.transfer.cancel()
                return True
        return any(engine.abort_request(request_id) for engine in (self.prefill, *self.decoders))

    @property
    def prefill_in_flight(self) -> bool:
        return self._prefill_step is not None

    @property
    def handovers_in_flight(self) -> list[str]:
        """Request ids whose KV is on its way to a decode engine."""
        return [h.seq.request_id for h in self._handovers if not h.aborted]

    @property
    def waiting_for_decode(self) -> list[str]:
        """Request ids prefilled and waiting, their KV in the prefill group's blocks, for a decode group's."""
        return [seq.request_id for seq in self._parked if not seq.is_finished]

    def has_unfinished_requests(self) -> bool:
        return self._prefill_step is not None or bool(self._handovers) or bool(self._parked) or any(
            e.has_unfinished_requests() or e.handoffs for e in (self.prefill, *self.decoders))

    def step(self) -> list[RequestOutput]:
        """One decode step on every decode group, plus the prefill step and the KV transfers that have
        finished meanwhile."""
        outputs = self._finish_handovers()
        if self._prefill_step is None:
            self._prefill_step = self.prefill.begin_step()
        began = time.perf_counter()
        decode_steps = [decoder.begin_step() for decoder in self.decoders]
        outputs += [out for decoder, step in zip(self.decoders, decode_steps) for out in decoder.finish_step(step)]
        step_s = time.perf_counter() - began
        for decoder, step in zip(self.decoders, decode_steps):
            if step is not None:
                self._paces[decoder].observe_step(step_s)
        if self.decode_step_observer is not None and not all(step is None for step in decode_steps):
            self.decode_step_observer(sum(len(step.work) for step in decode_steps if step is not None), step_s)
        outputs += self._hand_over_parked()  # into the blocks these steps freed
        prefill_step = self._prefill_step
        idle = all(step is None for step in decode_steps)
        if prefill_step is not None and (prefill_step.done() or (idle and not self._handovers)):
            self._prefill_step = None
            outputs += self._finish_prefill(prefill_step)
        if idle and self._handovers and not outputs:  # nothing else to do: wait for the oldest transfer
            outputs += self._finish_handovers(wait=True)
        return outputs

    def _finish_handovers(self, wait: bool = False) -> list[RequestOutput]:
        """Move each transfer on by one piece and complete those done; `wait`: complete the oldest, waiting."""
        outputs: list[RequestOutput] = []
        for handover in list(self._handovers):
            if wait:
                wait = False
            elif not handover.transfer.advance():
                continue
            self._handovers.remove(handover)
            outputs += self._complete(handover)
        return outputs

    def _complete(self, handover: _Handover) -> list[RequestOutput]:
        seq, decoder = handover.seq, handover.decoder
        if decoder.block_manager is not handover.block_manager or decoder.failure is not None:
            lost = WorkerLostError("the decode group was lost during the KV transfer; retry")
            return [] if handover.aborted else [_failed(seq, lost)]
        try:
            handover.transfer.finish()
        except WorkerLostError as err:
            decoder.block_manager.free(seq)
            if handover.aborted:
                return [out for engine in self._lost(decoder) for out in engine.fail_all(err)]
            return [out for engine in self._lost(decoder) for out in engine.fail_all(err)] + [_failed(seq, err)]
        except GarrisonError as err:
            decoder.block_manager.free(seq)
            failed = KVTransferError(f"KV transfer to the decode group failed: {err}")
            return [] if handover.aborted else [_failed(seq, failed)]
        if handover.aborted:
            decoder.block_manager.free(seq)
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            return []
        decoder.admit(seq, handover.computed)
        return []

    def _lost(self, decoder: LLMEngine) -> list[LLMEngine]:
        return [engine for engine in (self.prefill, decoder) if engine.executor.failure is not None]

    def _finish_prefill(self, prefill_step: Any) -> list[RequestOutput]:
        outputs = self.prefill.finish_step(prefill_step)
        self._parked += self.prefill.take_handoffs()
        return outputs + self._hand_over_parked()

    def _hand_over_parked(self) -> list[RequestOutput]:
        """Hand prefilled sequences over, oldest first, while a decode group has blocks for the next one; the rest
        wait in the prefill group's blocks. One that no decode group could hold even empty is handed over to
        fail there, with the reason."""
        outputs: list[RequestOutput] = []
        while self._parked:
            seq = self._parked[0]
            if not seq.is_finished:  # else aborted, or failed with the prefill group, while it waited
                live = [(d.block_manager, d.block_manager.blocks_needed(seq.num_computed_tokens + 1))
                        for d in self.decoders if d.failure is None]
                could = any(needed <= blocks.num_blocks for blocks, needed in live)
                if could and not any(needed <= blocks.num_free_blocks for blocks, needed in live):
                    break  # decode steps will free blocks
                outputs += self._hand_over(seq)
            self._parked.pop(0)
        return outputs

    def _hand_over(self, seq: Sequence) -> list[RequestOutput]:
        num_tokens, source_blocks = seq.num_computed_tokens, list(seq.block_table)
        # Freed before the transfer reads them: only the next prefill step could reuse them, and the
        # export is sent to the prefill ranks before that step is (a Ray actor runs calls in the order sent).
        self.prefill.release(seq)
        live = [d for d in self.decoders if d.failure is None]
        if not live:
            return [_failed(seq, UnavailableError("no decode group of this replica is serving; retry"))]
        decoder = max(live, key=lambda d: d.block_manager.num_free_blocks)
        seq.num_computed_tokens = num_tokens
        try:
            computed = decoder.reserve(seq)
        except GarrisonError as err:
            return [_failed(seq, UnavailableError(f"the decode group cannot take this sequence now: {err}; retry"))]
        try:
            transfer = self._links[decoder].start(source_blocks, seq.block_table, num_tokens)
        except WorkerLostError as err:
            decoder.block_manager.free(seq)
            return [out for engine in self._lost(decoder) for out in engine.fail_all(err)] + [_failed(seq, err)]
        except GarrisonError as err:
            decoder.block_manager.free(seq)
            return [_failed(seq, KVTransferError(f"KV transfer to the decode group failed: {err}"))]
        self._handovers.append(_Handover(seq, decoder, computed, transfer, decoder.block_manager))
        return []


def _first_slice_tokens(decoder: LLMEngine) -> int:
    """Before any import has been timed: 4 MiB of KV, in whole blocks."""
    block_size = decoder.config.block_size
    token_bytes = decoder.model_config.kv_bytes_per_token(torch.finfo(decoder.config.dtype).bits // 8)
    return max(1, (4 << 20) // (token_bytes * block_size)) * block_size


def _link(prefill: LLMEngine, decoder: LLMEngine, pace: ImportPace) -> KVLink:
    transport = prefill.config.kv_transport
    if decoder.config.kv_transport != transport:
        raise LayoutError(f"the prefill engine moves KV with kv_transport {transport!r} but a decode engine with "
                          f"{decoder.config.kv_transport!r}; configure one transport for both")
    if transport == "ray":
        return HandleLink(prefill.executor, decoder.executor, pace)
    from garrison_workers.worker_group import WorkerGroup  # Ray is needed only for worker groups

    if not (isinstance(prefill.executor, WorkerGroup) and isinstance(decoder.executor, WorkerGroup)):
        raise LayoutError("kv_transport 'torch' joins the ranks of two Ray worker groups; start both the prefill "
                          "and the decode engines on Ray (on_ray=True), or use kv_transport 'ray'")
    return TorchChannel(prefill.executor, decoder.executor, prefill.model_config, pace)


def _failed(seq: Sequence, why: GarrisonError) -> RequestOutput:
    seq.status, seq.finish_reason = SequenceStatus.FINISHED, "error"
    return RequestOutput(seq.request_id, [], "", [], True, "error", seq.num_prompt_tokens, seq.num_output_tokens,
                         seq.num_cached_prompt_tokens, error=why)
