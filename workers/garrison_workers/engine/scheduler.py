"""Forms each step's batch under a token budget: continuous batching with chunked prefill.

Every sequence is "tokens known" vs "tokens computed"; a step gives each scheduled sequence some of
its uncomputed tokens: one for a decoding sequence, up to the remaining budget for a prompt. Running
sequences go first, oldest first, so streams keep flowing while long prompts advance chunk by chunk.
A prompt's chunk never takes the part of the budget that decoding sequences and waiting prompts
need (up to half of it): a new short prompt starts at the next step instead of after a long prompt's
last chunk.
With overlapped steps (LLMEngine's async scheduling) a sequence whose last token is still being sampled is
scheduled as if it were known (a placeholder the ranks fill in), unless that token ends it by length.
When blocks run out the newest running sequence is preempted: its blocks are freed and it waits to be
recomputed (its already-generated tokens become part of what is recomputed).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from garrison_workers.engine.block_manager import BlockManager
from garrison_workers.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    work: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute now)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:  # admitting while evicting would only thrash
            self._schedule_waiting(batch, budget)
        return batch

    def _chunk_cap(self, seq: Sequence) -> int:
        """Most tokens `seq` may compute this step: the budget minus what the others need (one per
        decoding sequence plus the waiting prompts), minus at most half (a long prompt keeps advancing)."""
        limit = self.max_num_batched_tokens // 2
        need = sum(1 for other in self.running if other is not seq and other.num_tokens - other.num_computed_tokens == 1)
        for other in self.waiting:
            if need >= limit:
                break
            if other is not seq:
                need += other.num_tokens - other.num_computed_tokens
        return self.max_num_batched_tokens - min(need, limit)

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining == 0:  # its last token is being sampled by the step in flight, and it ends with it
                index += 1
                continue
            count = min(remaining, budget, self._chunk_cap(seq) if remaining > 1 else 1)
            if self._make_room(seq, seq.num_computed_tokens + count, batch):
                batch.work.append((seq, count))
                budget -= count
                index += 1
        return budget

    def _make_room(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Preempt the newest running sequences until `seq` fits; False if `seq` itself was preempted."""
        while not self.block_manager.ensure_slots(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.block_manager.reuse_cached_prefix(seq)
            count = min(seq.num_tokens - seq.num_computed_tokens, budget, self._chunk_cap(seq))
            if not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + count):
                self.block_manager.free(seq)  # give back any prefix blocks; retry when memory frees up
                return
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.work.append((seq, count))
            budget -= count
