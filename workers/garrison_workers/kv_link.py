"""The driver's side of a KV transfer: how a prefill executor's KV reaches a decode executor's blocks.

A `DisaggregatedEngine` holds one link per decode engine, chosen by `EngineConfig.kv_transport`. Every link
has the one call `transfer(source_blocks, dest_blocks, num_tokens)`; freeing blocks stays with the caller.

- `HandleLink` ("ray"): the prefill ranks export handles (Ray object references, or payloads in this
  process), then the decode ranks import them. Any executors, on one node or across nodes.
- `TorchChannel` ("torch"): a torch.distributed process group of both Ray worker groups' ranks (gloo on
  CPU, NCCL on GPU), built from its own TCPStore, apart from each group's own process group. The driver
  starts the receives and the sends together and waits for both. Opened with the link, and again after a
  failed transfer (messages may be left pending in the old group) or a restart of either group.
"""

from __future__ import annotations

import itertools
import uuid
from typing import TYPE_CHECKING, Protocol

from garrison_workers.errors import GarrisonError, WorkerLostError
from garrison_workers.kv_transfer import HeadShard, KVRoute

if TYPE_CHECKING:
    from garrison_workers.config import ModelConfig
    from garrison_workers.engine.executor import Executor, PendingExport
    from garrison_workers.worker_group import PendingStep, WorkerGroup

# Tags of one transfer: header, K and V. Gloo keeps tags in 32 bits; a channel's tags wrap long after any
# transfer that could still be pending on it has timed out.
_TAGS_PER_TRANSFER = 3
_TAG_LIMIT = 1 << 30


class Transfer(Protocol):
    def done(self) -> bool:
        """True once `finish()` would not wait for a remote group."""
        ...

    def finish(self) -> None:
        """Complete the transfer. Raises KVTransferError for a short, malformed or corrupt transfer (nothing
        usable is in the destination blocks) and WorkerLostError when a group lost a rank (that executor's
        `failure` says which)."""
        ...


class KVLink(Protocol):
    def start(self, source_blocks: list[int], dest_blocks: list[int], num_tokens: int) -> Transfer:
        """Start moving a sequence's first `num_tokens` tokens of KV from the source's blocks into the
        destination's; the driver keeps stepping until the transfer is `done()`."""
        ...

    def transfer(self, source_blocks: list[int], dest_blocks: list[int], num_tokens: int) -> None:
        """`start(...).finish()`: the whole transfer, waiting."""
        ...


class HandleLink:
    def __init__(self, source: Executor, dest: Executor) -> None:
        self.source, self.dest = source, dest

    def start(self, source_blocks: list[int], dest_blocks: list[int], num_tokens: int) -> "_HandleTransfer":
        return _HandleTransfer(self.source.start_export_kv(source_blocks, num_tokens), self.dest, dest_blocks,
                               num_tokens)

    def transfer(self, source_blocks: list[int], dest_blocks: list[int], num_tokens: int) -> None:
        self.start(source_blocks, dest_blocks, num_tokens).finish()


class _HandleTransfer:
    """The export runs on the prefill ranks while the driver steps; the import (local, or on the decode
    ranks) runs in `finish`, once the handles exist."""

    def __init__(self, export: PendingExport, dest: Executor, dest_blocks: list[int], num_tokens: int) -> None:
        self.export, self.dest, self.dest_blocks, self.num_tokens = export, dest, dest_blocks, num_tokens

    def done(self) -> bool:
        return self.export.done()

    def finish(self) -> None:
        self.dest.import_kv(self.dest_blocks, self.num_tokens, self.export.handles())


class TorchChannel:
    """Channel ranks: the prefill group's ranks first, then the decode group's. The prefill ranks of ep_rank 0
    send (EP ranks hold copies of the same heads); every decode rank receives the heads it holds."""

    def __init__(self, prefill: WorkerGroup, decode: WorkerGroup, model_config: ModelConfig) -> None:
        self.prefill, self.decode, self.model_config = prefill, decode, model_config
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
        return _ChannelTransfer(self, self.decode.receive_kv(dest_blocks, num_tokens, route),
                                self.prefill.send_kv(source_blocks, num_tokens, route))

    def transfer(self, source_blocks: list[int], dest_blocks: list[int], num_tokens: int) -> None:
        self.start(source_blocks, dest_blocks, num_tokens).finish()

    def route(self, num_tokens: int) -> KVRoute:
        config, prefill, decode = self.model_config, self.prefill.dims, self.decode.dims
        sent, held = config.num_kv_heads // prefill.tp, config.num_kv_heads // decode.tp
        senders = tuple(HeadShard(rank, prefill.coords(rank)[1] * sent, sent) for rank in prefill.tp_group_ranks(0))
        receivers = tuple(HeadShard(prefill.world_size + rank, decode.coords(rank)[1] * held, held)
                          for rank in range(decode.world_size))
        tag = next(self._tags) * _TAGS_PER_TRANSFER % _TAG_LIMIT
        return KVRoute(self.name, tag, num_tokens, config.num_layers, config.head_dim, senders, receivers)

    def _open(self) -> None:
        host, port = self.prefill.rendezvous_address()
        first_decode, size = self.prefill.dims.world_size, self.prefill.dims.world_size + self.decode.dims.world_size
        _wait_all(self.prefill.join_kv_channel(self.name, host, port, 0, size),
                  self.decode.join_kv_channel(self.name, host, port, first_decode, size))
        self._opened_at = (self.prefill.generation, self.decode.generation)


class _ChannelTransfer:
    def __init__(self, channel: TorchChannel, *sides: PendingStep) -> None:
        self.channel, self.sides = channel, sides

    def done(self) -> bool:
        return all(side.done() for side in self.sides)

    def finish(self) -> None:
        try:
            _wait_all(*self.sides)
        except BaseException:
            self.channel._opened_at = None  # messages may be left pending in the old group: reopen
            raise


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
