"""The engine loop: admit requests, schedule a step, run it, sample, stream what each request gained.

Single-threaded by design: a caller (the CLI, or an engine core) drives `step()`; requests may be added and
aborted between steps. An aborted or finished request's blocks are freed before the call returns.

Where the ranks are another process (`Executor.overlaps`), steps overlap (async scheduling, as vLLM calls it):
`step()` sends the next step before it takes the last one's tokens, so the ranks start it the moment they finish,
instead of waiting for the round trip to this process and back (1-3 ms a step on a CPU node, more than a GPU's
decode step is worth). The next step is scheduled as if the tokens in flight were known: each sequence that draws
gets a placeholder token, which the ranks fill in with what rank 0 sampled (`SeqChunk.follows`), and the step's
tokens are counted as computed when it is sent. A sequence whose in-flight token ends it by length is not
scheduled again; one that the token ends otherwise (EOS, a stop string) has computed one token for nothing, which
is dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal


from garrison_workers.compiled import check_compilable
from garrison_workers.config import ModelConfig
from garrison_workers.engine.block_manager import BlockManager
from garrison_workers.engine.config import EngineConfig
from garrison_workers.engine.executor import Executor, LocalExecutor, StepFuture
from garrison_workers.engine.model_runner import ModelRunner, SeqChunk
from garrison_workers.engine.output_text import OutputText
from garrison_workers.engine.sampler import SampledToken
from garrison_workers.engine.scheduler import Scheduler
from garrison_workers.engine.sequence import SamplingParams, Sequence, SequenceStatus
from garrison_workers.errors import (CapacityError, ContextLengthError, GarrisonError, InvalidRequestError,
                                     SequenceError, WorkerLostError)
from garrison_workers.loader import ModelLocation, build_model, compute_dtype, open_model_files
from garrison_workers.parallel.dims import ParallelDims
from garrison_workers.placement import GroupPlacement
from garrison_workers.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

PLACEHOLDER = -1  # a token sampled by a step in flight: the ranks fill it in (SeqChunk.follows), this engine later

@dataclass(slots=True)
class RequestOutput:
    """What one request gained in one step (a streaming delta), and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[float | None]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_prompt_tokens: int
    # Why the request failed (finish_reason "error"): WorkerLostError (its replica lost a rank), KVTransferError (its
    # handoff failed), SequenceError (a fault of this sequence alone); its class decides the status a client sees.
    error: GarrisonError | None = None
    new_top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)  # per new token, if asked
    started: bool = False  # the request has just entered the engine (an engine core's admission let it in)


@dataclass(slots=True)
class Completion:
    """A whole finished request, as `generate` returns it."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    finish_reason: str | None = None


Role = Literal["both", "prefill", "decode"]


@dataclass(slots=True)
class _Step:
    work: list[tuple[Sequence, int]]
    chunks: list[SeqChunk]
    future: StepFuture | None
    error: WorkerLostError | None = None
    # Overlapped steps are counted as computed when sent; per chunk, where its sampled token goes in the sequence's
    # token ids (its placeholder's index), or None to append it. None: a step counted when it is finished.
    fills: list[int | None] | None = None

    def done(self) -> bool:
        return self.future is None or self.future.done()


def num_kv_blocks(model_config: ModelConfig, config: EngineConfig, tp: int = 1) -> int:
    """Blocks that fit the per-rank KV budget (each TP rank holds 1/tp of every block)."""
    block_bytes = ModelRunner.kv_block_bytes(model_config, config.block_size, config.dtype, tp)
    return config.num_kv_blocks or max(1, config.kv_cache_bytes // block_bytes)


class LLMEngine:
    def __init__(self, executor: Executor, model_config: ModelConfig, tokenizer: Tokenizer | None,
                 config: EngineConfig, num_blocks: int, role: Role = "both") -> None:
        self.executor, self.model_config, self.tokenizer, self.config = executor, model_config, tokenizer, config
        self.num_blocks = num_blocks
        self._new_scheduler()
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings, num_blocks * config.block_size)
        self.eos_token_ids = frozenset(model_config.eos_token_ids) | frozenset(
            tokenizer.eos_token_ids if tokenizer else ())
        self._seqs: dict[str, Sequence] = {}
        self.failure: WorkerLostError | None = None
        self.role = role
        self.handoffs: list[Sequence] = []
        self._ahead: _Step | None = None  # an overlapped step sent before the last one's tokens were taken

    @classmethod
    def from_path(cls, path: ModelLocation, config: EngineConfig = EngineConfig(),
                  dims: ParallelDims = ParallelDims(), role: Role = "both", on_ray: bool | None = None,
                  placement: GroupPlacement = GroupPlacement()) -> "LLMEngine":
        """An engine over one replica: in this process, or as a `tp × ep` worker group on Ray.

        `on_ray` None puts parallel replicas on Ray and a single rank here; True puts even a single rank
        in its own Ray actor, so its steps run beside this process's (a prefill group beside a decode engine).
        `placement`: where a group on Ray may go (packed or spread over nodes, which nodes).
        """
        files = open_model_files(path)
        dims.validate(files.config)
        if config.compile_decode:
            check_compilable(files.config)
        dtype, kernel_dtype = compute_dtype(config.dtype, files.source)
        config = dataclasses.replace(config, dtype=dtype, kernel_dtype=config.kernel_dtype or kernel_dtype)
        num_blocks = num_kv_blocks(files.config, config, dims.tp)
        executor: Executor
        if not (dims.world_size > 1 if on_ray is None else on_ray):
            model = build_model(files.config, files.source, config.dtype, config.device,
                                kernel_dtype=config.kernel_dtype)
            executor = LocalExecutor(model, num_blocks, config)
        else:
            from garrison_workers.worker_group import WorkerGroup  # Ray is needed only for parallel replicas

            executor = WorkerGroup(path, dims, num_blocks, config, placement=placement).start()
        return cls(executor, files.config, files.tokenizer, config, num_blocks, role)

    def _new_scheduler(self) -> None:
        config = self.config
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)

    def restart(self) -> None:
        """Bring a failed executor back with an empty KV cache (and so an empty prefix cache). Until it returns, the
        engine stays failed: its steps and new requests do not reach the executor (a supervisor may call this from
        a thread of its own while the engine's thread goes on with the replica's other engines)."""
        self.executor.restart()
        self._new_scheduler()
        self._ahead = None
        self.failure = None

    def lost(self) -> WorkerLostError | None:
        """The executor's failure when it has lost a rank (known without a step), else None."""
        return self.executor.lost()

    def shutdown(self) -> None:
        self.executor.shutdown()

    # -- requests ---------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    salt: bytes = b"") -> None:
        if self.failure is not None:
            raise WorkerLostError(f"{self.failure}")
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self._validate_prompt(prompt_token_ids)
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, salt)
        if self.tokenizer is not None:
            seq.text = OutputText(IncrementalDetokenizer(self.tokenizer, prompt_token_ids), params.stop)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Drop a request wherever it is; its blocks are free when this returns. False if unknown."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._ahead is not None

    @property
    def num_active_requests(self) -> int:
        return len(self._seqs)

    def _validate_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]!r} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt) >= self.max_model_len:
            limit = self.max_model_len
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but at most {limit - 1} fit with room to generate "
                f"(model context {self.model_config.max_position_embeddings}, KV cache "
                f"{self.block_manager.num_blocks * self.config.block_size} tokens); shorten the prompt")
        if self.block_manager.blocks_needed(len(prompt) + 1) > self.block_manager.num_blocks:
            raise CapacityError(f"the KV cache holds {self.block_manager.num_blocks} blocks, too few for this prompt")

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if not self._overlapping():
            return self.finish_step(self.begin_step())
        current, self._ahead = self._ahead or self._begin_overlapped(None), None
        if current is not None and current.error is None:
            self._ahead = self._begin_overlapped(current)
        try:
            return self.finish_step(current)
        except BaseException:  # the step's tokens never came: the one sent after it would fill in nothing
            self._ahead = None
            raise

    def _overlapping(self) -> bool:
        # A prefill group's steps end in a handoff of their KV, which must not race a step in flight.
        return self.config.async_scheduling and self.role == "both" and self.executor.overlaps

    def _begin_overlapped(self, previous: "_Step | None") -> "_Step | None":
        """Start a step while `previous` may still run: its draws are placeholders the ranks fill in."""
        step = self.begin_step(previous)
        if step is None or step.error is not None:
            return step
        step.fills = []
        for (seq, count), chunk in zip(step.work, step.chunks):
            seq.num_computed_tokens += count
            fill = None
            if chunk.draw is not None and not self._ends_by_length(seq, seq.num_tokens + 1):
                seq.token_ids.append(PLACEHOLDER)
                fill = seq.num_tokens - 1
            step.fills.append(fill)
        return step

    def begin_step(self, previous: "_Step | None" = None) -> "_Step | None":
        """Schedule and start a step on the executor; `finish_step` samples it. Split so that a
        prefill group and a decode group can compute at the same time. `previous`: the overlapped step whose
        draws are this step's placeholders."""
        if self.failure is not None:  # failed, perhaps restarting on a supervisor's thread: leave its executor be
            return None
        batch = self.scheduler.schedule()
        if not batch.work:
            return None
        draw_numbers: dict[str, int] = {}
        if previous is not None:
            drawn = [seq for (seq, _), chunk in zip(previous.work, previous.chunks) if chunk.draw is not None]
            draw_numbers = {seq.request_id: number for number, seq in enumerate(drawn)}
        chunks = []
        for seq, count in batch.work:
            start = seq.num_computed_tokens
            tokens = seq.token_ids[start:start + count]
            follows = draw_numbers[seq.request_id] if tokens[-1] == PLACEHOLDER else None
            assert follows is None or count == 1, "only a sequence's last token is ever a placeholder"
            chunks.append(SeqChunk(tokens, start, seq.block_table,
                                   seq.next_draw() if start + count == seq.num_tokens else None, follows))
        try:
            return _Step(batch.work, chunks, self.executor.submit(chunks))
        except WorkerLostError as err:
            return _Step(batch.work, chunks, None, err)

    def finish_step(self, step: "_Step | None") -> list[RequestOutput]:
        if step is None:
            return []
        try:
            if step.error is not None:
                raise step.error
            assert step.future is not None
            drawn = iter(step.future.result())
        except WorkerLostError as err:
            return self.fail_all(err)
        outputs: list[RequestOutput] = []
        sampled: list[Sequence] = []
        fills = step.fills or [None] * len(step.work)
        for (seq, count), chunk, fill in zip(step.work, step.chunks, fills):
            token = next(drawn) if chunk.draw is not None else None
            if seq.is_finished:  # aborted while its step ran, or ended by the token before (overlapped steps)
                continue
            if step.fills is None:
                seq.num_computed_tokens += count
                self.block_manager.publish_full_blocks(seq)
            if token is not None:
                outputs.append(self._append(seq, token, fill))
                sampled.append(seq)
            if step.fills is not None:  # now that its placeholder is filled in
                self.block_manager.publish_full_blocks(seq)
        if self.role == "prefill":
            self._hold_for_handoff(sampled)
        return outputs

    # -- disaggregation: a prefill engine hands sequences to a decode engine ----------------------

    def _hold_for_handoff(self, sampled: list[Sequence]) -> None:
        """Prefilled sequences leave the batch (their blocks stay) until their KV is handed over."""
        for seq in sampled:
            if not seq.is_finished:
                self.scheduler.running.remove(seq)
                self.handoffs.append(seq)

    def take_handoffs(self) -> list[Sequence]:
        ready, self.handoffs = self.handoffs, []
        return ready

    def release(self, seq: Sequence) -> None:
        """Forget a handed-off (or failed) sequence and free its blocks here."""
        self.block_manager.free(seq)
        self._seqs.pop(seq.request_id, None)

    def adopt(self, seq: Sequence, receive: Callable[[list[int]], None]) -> None:
        """Continue decoding a sequence prefilled elsewhere: `receive(block_table)` fills the blocks allocated
        for it here (a KV transfer); if that raises, they are freed again and the sequence is not kept."""
        computed = self.reserve(seq)
        try:
            receive(seq.block_table)
        except BaseException:
            self.block_manager.free(seq)
            raise
        self.admit(seq, computed)

    def reserve(self, seq: Sequence) -> int:
        """Allocate blocks here for a sequence prefilled elsewhere, for its KV to arrive in; returns its
        computed tokens. Until `admit`, the sequence is not this engine's: free its blocks on failure."""
        if self.failure is not None:
            raise WorkerLostError(f"{self.failure}")
        computed = seq.num_computed_tokens
        seq.block_table, seq.num_hashed_blocks, seq.num_computed_tokens = [], 0, 0
        if not self.block_manager.ensure_slots(seq, computed + 1):
            raise CapacityError(f"the decode group has {self.block_manager.num_free_blocks} free KV blocks, too few "
                                f"for {computed} tokens")
        return computed

    def admit(self, seq: Sequence, computed: int) -> None:
        """The sequence's KV is in its reserved blocks: decode it from the next step."""
        seq.num_computed_tokens = computed
        self._seqs[seq.request_id] = seq
        seq.status = SequenceStatus.RUNNING
        self.scheduler.running.append(seq)

    def fail_all(self, err: WorkerLostError) -> list[RequestOutput]:
        """The executor lost a rank: every in-flight request ends with the error and frees its blocks."""
        self.failure = err
        self._ahead = None
        return [self._fail(seq, err) for seq in list(self._seqs.values())]

    def _fail(self, seq: Sequence, err: GarrisonError) -> RequestOutput:
        seq.finish_reason = "error"
        self._finish(seq)
        known = seq.num_output_tokens - seq.token_ids[-2:].count(PLACEHOLDER)  # overlapped steps' tokens in flight
        return RequestOutput(seq.request_id, [], "", [], True, "error", seq.num_prompt_tokens, known,
                             seq.num_cached_prompt_tokens, error=err)

    def _append(self, seq: Sequence, sampled: SampledToken, fill: int | None = None) -> RequestOutput:
        """Add a sampled token to its sequence (at `fill`, its placeholder, if it has one). A fault here is the
        sequence's own (its logits, its text): it ends that sequence with an error and never the step, so the
        others in the batch go on."""
        if sampled.error is not None:
            return self._fail(seq, SequenceError(f"request {seq.request_id}: {sampled.error}"))
        try:
            return self._append_token(seq, sampled, fill)
        except Exception as err:
            log.exception("request %s failed on its token %d", seq.request_id, sampled.token_id)
            return self._fail(seq, SequenceError(f"request {seq.request_id} failed on its generated token "
                                                 f"{sampled.token_id} ({type(err).__name__})"))

    def _append_token(self, seq: Sequence, sampled: SampledToken, fill: int | None) -> RequestOutput:
        token = sampled.token_id
        if fill is None:
            seq.token_ids.append(token)
            fill = seq.num_tokens - 1
        else:
            seq.token_ids[fill] = token
        num_tokens = fill + 1  # the sequence's tokens up to this one (an overlapped step's placeholder may follow)
        params = seq.params
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            seq.finish_reason = "stop"
        elif self._ends_by_length(seq, num_tokens):
            seq.finish_reason = "length"
        new_text = ""
        if seq.text is not None:
            new_text, stopped = seq.text.push(token, last=seq.finish_reason is not None)
            if stopped:
                seq.finish_reason = "stop"
        if seq.finish_reason is not None:
            self._finish(seq)
        return RequestOutput(seq.request_id, [token], new_text, [sampled.logprob], seq.finish_reason is not None,
                             seq.finish_reason, seq.num_prompt_tokens, num_tokens - seq.num_prompt_tokens,
                             seq.num_cached_prompt_tokens, new_top_logprobs=[sampled.top] if sampled.top else [])

    def _ends_by_length(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` tokens (prompt and output) may not grow further."""
        return num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens or num_tokens >= self.max_model_len

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        del self._seqs[seq.request_id]

    # -- convenience ------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run prompts to completion together (continuous batching) and return them in order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{next(_GENERATE_IDS)}" for _ in prompts]
        for request_id, prompt, p in zip(ids, prompts, all_params):
            self.add_request(request_id, prompt, p)
        results = {request_id: Completion(request_id) for request_id in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                done = results[out.request_id]
                done.token_ids += out.new_token_ids
                done.text += out.new_text
                done.logprobs += out.new_logprobs
                done.top_logprobs += out.new_top_logprobs
                done.finish_reason = out.finish_reason
        return [results[request_id] for request_id in ids]


_GENERATE_IDS = itertools.count()
