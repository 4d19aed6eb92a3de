"""The driver's side of a KV transfer: how a prefill executor's KV reaches a decode executor's blocks.

A `DisaggregatedEngine` holds one link per decode engine, chosen by `EngineConfig.kv_transport`. A link
`start`s a transfer, which the driver moves on a piece per decode step (`advance`) and then `finish`es;
freeing blocks stays with the caller.

- `HandleLink` ("ray"): the prefill ranks export handles (Ray object references, or payloads in this
  process), then the decode ranks import them. Any executors, on one node or across nodes.
- `TorchChannel` ("torch"): a torch.distributed process group of both Ray worker groups' ranks (gloo on
  CPU, NCCL on GPU), built from its own TCPStore, apart from each group's own process group. The driver
  starts the sends and the receives together; both run on the ranks' channel threads, so neither group's
  steps wait for them, and the decode ranks stage what arrives. Short transfers take the channel's
  express lane, long ones its bulk lane, so that a short prompt's KV never waits behind a long one's.
  Opened with the link, and again after a failed transfer (messages may be left pending in the old
  group) or a restart of either group.

Either way the decode ranks then write the KV into their blocks a slice of tokens per decode step, sized by
an `ImportPace`, so that a long prompt's KV (a gigabyte at a million tokens of a small model) never holds
one step of the streams for its whole copy.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import TYPE_CHECKING, Any, Protocol

from garrison_workers.errors import GarrisonError, WorkerLostError
from garrison_workers.kv_transfer import EXPRESS_BYTES, HeadShard, KVRoute, StagedKV

if TYPE_CHECKING:
    from garrison_workers.config import ModelConfig
    from garrison_workers.engine.executor import Executor, PendingExport, PendingImport
    from garrison_workers.worker_group import PendingStep, WorkerGroup

# Tags of one transfer: header, K and V. Gloo keeps tags in 32 bits; a channel's tags wrap long after any
# transfer that could still be pending on it has timed out.
_TAGS_PER_TRANSFER = 3
_TAG_LIMIT = 1 << 30


class Transfer(Protocol):
    def advance(self) -> bool:
        """Move the transfer on by at most one bounded piece of work without waiting (a sliced import); True
        once `finish()` has nothing left to do but report. Errors wait for `finish()`."""
        ...

    def cancel(self) -> None:
        """Start no more pieces (the request was aborted): `advance()` is True once those in flight are done,
        and `finish()` imports nothing more. The destination blocks then hold nothing usable."""
        ...

    def finish(self) -> None:
        """Complete the transfer. Raises KVTransferError for a short, malformed or corrupt transfer (nothing
        usable is in the destination blocks) and WorkerLostError when a group lost a rank (that executor's
        `failure` says which)."""
        ...


class KVLink(Protocol):
    def start(self, source_blocks: list[int], dest_blocks: list[int], num_tokens: int) -> Transfer:
        """Start moving a sequence's first `num_tokens` tokens of KV from the source's blocks into the
        destination's; the source's blocks may be reused by its next step."""
        ...

    def transfer(self, source_blocks: list[int], dest_blocks: list[int], num_tokens: int) -> None:
        """`start(...).finish()`: the whole transfer, waiting."""
        ...


class ImportPace:
    """How many tokens of KV one decode step may import: what takes about `share` of a decode step at the speed
    the ranks have imported so far (their own copy time, not the driver's round trip). It adapts to the
    hardware: slices of a few hundred kilobytes on a CPU, of gigabytes between GPUs."""

    def __init__(self, first_tokens: int, block_size: int, share: float = 0.25, fixed: bool = False) -> None:
        """`fixed`: always `first_tokens` (a set slice size, not paced)."""
        self.first_tokens, self.block_size, self.share, self.fixed = first_tokens, block_size, share, fixed
        self.tokens_per_s: float | None = None
        self.step_s: float | None = None

    def tokens(self) -> int:
        if self.fixed or self.tokens_per_s is None or self.step_s is None:
            return self.first_tokens
        budget = int(self.tokens_per_s * self.step_s * self.share)
        return max(self.block_size, budget // self.block_size * self.block_size)

    def observe_step(self, seconds: float) -> None:
        self.step_s = _moving_average(self.step_s, seconds)

    def observe_import(self, tokens: int, seconds: float) -> None:
        if tokens and seconds > 0:
            self.tokens_per_s = _moving_average(self.tokens_per_s, tokens / seconds)


def _moving_average(average: float | None, sample: float, weight: float = 0.1) -> float:
    return sample if average is None else average + weight * (sample - average)


class HandleLink:
    """`pace` None imports each sequence whole; with one, `advance()` imports one slice per call."""

    def __init__(self, source: Executor, dest: Executor, pace: ImportPace | None = None) -> None:
        self.source, self.dest, self.pace = source, dest, pace

    def start(self, source_blocks: list[int], dest_blocks: list[int], num_tokens: int) -> "_ReleasingTransfer":
        return _ReleasingTransfer(_HandleTransfer(self.source.start_export_kv(source_blocks, num_tokens), self.dest,
                                                  dest_blocks, num_tokens, self.pace))

    def transfer(self, source_blocks: list[int], dest_blocks: list[int], num_tokens: int) -> None:
        self.start(source_blocks, dest_blocks, num_tokens).finish()


class _HandleTransfer:
    """The export runs on the prefill ranks while the driver steps; then the destination imports the tokens
    slice by slice, one per `advance()` (local, or started on the decode ranks ahead of their next step), or
    all that is left in `finish()`. A slice of KV still arriving (over a channel) is started again later.
    Nothing is decoded before the last slice is in: `finish()` reports."""

    def __init__(self, export: PendingExport, dest: Executor, dest_blocks: list[int], num_tokens: int,
                 pace: ImportPace | None) -> None:
        self.export, self.dest, self.dest_blocks, self.num_tokens = export, dest, dest_blocks, num_tokens
        self.pace = pace
        self.cancelled = False
        self.handles: list[Any] | None = None  # the export's, once it is done
        self._next = 0  # tokens whose import has started
        self._slice: tuple[PendingImport, int, int] | None = None  # the import in flight, its start and stop
        self._error: GarrisonError | None = None

    def advance(self) -> bool:
        if self._settle(wait=False) and self._wanted() and self.export.done():
            self._start_slice(self.pace.tokens() if self.pace else self.num_tokens)
            self._settle(wait=False)  # a local import is already done
        return self._slice is None and not self._wanted()

    def cancel(self) -> None:
        self.cancelled = True

    def finish(self) -> None:
        self._settle(wait=True)
        pause = 0.0005
        while self._wanted():
            start = self._next
            self._start_slice(self.num_tokens)
            self._settle(wait=True)
            if self._next == start and self._error is None:  # still arriving: ask again, less and less often
                time.sleep(pause)
                pause = min(2 * pause, 0.01)
        if self._error is not None:
            raise self._error

    def _wanted(self) -> bool:
        """Tokens are left to import (and nothing stops it)."""
        return self._error is None and not self.cancelled and self._next < self.num_tokens

    def _start_slice(self, max_tokens: int) -> None:
        start, stop = self._next, min(self.num_tokens, self._next + max_tokens)
        try:
            if self.handles is None:
                self.handles = self.export.handles()
            self._slice = (self.dest.start_import_kv(self.dest_blocks, self.num_tokens, self.handles, start, stop),
                           start, stop)
            self._next = stop
        except GarrisonError as err:
            self._error = err

    def _settle(self, wait: bool) -> bool:
        """Take the result of the slice in flight; False while it still runs (and not `wait`)."""
        if self._slice is None:
            return True
        pending, start, stop = self._slice
        if not (wait or pending.done()):
            return False
        self._slice = None
        try:
            seconds = pending.result()
        except GarrisonError as err:
            self._error = err
            return True
        if seconds is None:  # not arrived yet: that slice again
            self._next = start
        elif self.pace is not None:
            self.pace.observe_import(stop - start, seconds)
        return True


class _ImportsTransfer:
    """A transfer whose slices are `imports`' own; subclasses say what its end releases."""

    def __init__(self, imports: _HandleTransfer) -> None:
        self.imports = imports

    def advance(self) -> bool:
        return self.imports.advance()

    def cancel(self) -> None:
        self.imports.cancel()


class _ReleasingTransfer(_ImportsTransfer):
    """An object-store transfer that, once over, lets the destination forget the payloads it has read (kept there
    from one slice to the next)."""

    def finish(self) -> None:
        try:
            self.imports.finish()
        finally:
            if self.imports.handles is not None:
                self.imports.dest.drop_kv(self.imports.handles)


class TorchChannel:
    """Channel ranks: the prefill group's ranks first, then the decode group's. The prefill ranks of ep_rank 0
    send (EP ranks hold copies of the same heads); every decode rank receives the heads it holds, then imports
    them a slice per `advance()` (`pace`; None: whole)."""

    def __init__(self, prefill: WorkerGroup, decode: WorkerGroup, model_config: ModelConfig,
                 pace: ImportPace | None = None) -> None:
        self.prefill, self.decode, self.model_config, self.pace = prefill, decode, model_config, pace
        self._token_bytes = model_config.kv_bytes_per_token(prefill.config.dtype.itemsize)
        self.name = f"kv-{uuid.uuid4().hex[:12]}"
        self._tags = itertools.count()
        self._opened_at: tuple[int, int] | None = None  # both groups' generations when joined; None: reopen
        self._open()

    def start(self, source_blocks: list[int], dest_blocks: list[int], num_tokens: int) -> "_ChannelTransfer":
        # A group already known lost is refused before either side starts: the other would wait out its timeout.
        for group in (self.prefill, self.decode):
            if group.failure is not None:
                raise group.failure
        if self._opened_at != (self.prefill.generation, self.decode.generation):
            self._open()
        route = self.route(num_tokens)
        staged = StagedKV(route.channel, route.tag)
        posted = _Posted(staged, self.decode.receive_kv(route), self.prefill.send_kv(source_blocks, num_tokens, route))
        return _ChannelTransfer(self, _HandleTransfer(posted, self.decode, dest_blocks, num_tokens, self.pace), staged)

    def transfer(self, source_blocks: list[int], dest_blocks: list[int], num_tokens: int) -> None:
        self.start(source_blocks, dest_blocks, num_tokens).finish()

    def route(self, num_tokens: int) -> KVRoute:
        config, prefill, decode = self.model_config, self.prefill.dims, self.decode.dims
        sent, held = config.num_kv_heads // prefill.tp, config.num_kv_heads // decode.tp
        senders = tuple(HeadShard(rank, prefill.coords(rank)[1] * sent, sent) for rank in prefill.tp_group_ranks(0))
        receivers = tuple(HeadShard(prefill.world_size + rank, decode.coords(rank)[1] * held, held)
                          for rank in range(decode.world_size))
        tag = next(self._tags) * _TAGS_PER_TRANSFER % _TAG_LIMIT
        lane = 0 if num_tokens * self._token_bytes <= EXPRESS_BYTES else 1  # all heads' bytes: the same on any tp
        return KVRoute(self.name, tag, lane, num_tokens, config.num_layers, config.head_dim, senders, receivers)

    def _open(self) -> None:
        host, port = self.prefill.rendezvous_address()
        first_decode, size = self.prefill.dims.world_size, self.prefill.dims.world_size + self.decode.dims.world_size
        _wait_all(self.prefill.join_kv_channel(self.name, host, port, 0, size),
                  self.decode.join_kv_channel(self.name, host, port, first_decode, size))
        self._opened_at = (self.prefill.generation, self.decode.generation)


class _Posted:
    """Both sides of a channel transfer posted on the ranks (the prefill ranks' export copied out of their blocks):
    from then on the decode ranks' staged KV is the transfer's one handle."""

    def __init__(self, staged: StagedKV, *sides: PendingStep) -> None:
        self.staged, self.sides = staged, sides

    def done(self) -> bool:
        return all(side.done() for side in self.sides)

    def handles(self) -> list[Any]:
        _wait_all(*self.sides)
        return [self.staged]


class _ChannelTransfer(_ImportsTransfer):
    def __init__(self, channel: TorchChannel, imports: _HandleTransfer, staged: StagedKV) -> None:
        super().__init__(imports)
        self.channel, self.staged = channel, staged

    def finish(self) -> None:
        try:
            self.imports.finish()
        except BaseException:
            self.channel._opened_at = None  # messages may be left pending in the old group: reopen
            raise
        finally:  # queued on the decode ranks after the last slice, ahead of their next step
            self.channel.decode.drop_kv([self.staged])


def _wait_all(*pending: PendingStep) -> None:
    """Wait for every side even when one fails (a side still running would hold its group's next call), then
    raise a lost rank before any other error: the caller must fail that group's requests."""
    errors: list[GarrisonError] = []
    for side in pending:
        try:
            side.result()
        except GarrisonError as err:
            errors.append(err)
    if errors:
        raise next((err for err in errors if isinstance(err, WorkerLostError)), errors[0])
