"""Moving a sequence's KV cache from a prefill group to a decode group.

The prefill side exports, per TP rank, the K and V of every layer for the sequence's tokens (its
share of the KV heads); the decode side imports into freshly allocated blocks, taking the heads its
own TP rank holds, so groups of different `tp` interoperate (heads are concatenated, then re-split).
Payloads travel through a `KVTransport`, on the ranks:

- through Ray's object store (CPU, and across nodes): `send` puts the shard in the store and returns
  the reference; the driver hands the references to the receivers once every send is done;
- through torch.distributed point-to-point (gloo on CPU, NCCL on GPU): a process group of both groups'
  ranks (`kv_link.TorchChannel` sets it up); `send` goes straight to the receiving ranks that need
  the shard's heads, and `start_receive` stages them on the receiving rank. Both run on threads of the
  rank, so that neither group's steps wait for the transfer (the receive of a long prompt's KV would
  otherwise hold the decode rank, and its streams, for as long). The handle of staged KV is a
  `StagedKV`, known to the driver before anything has arrived.

Either way the receiver checks what arrived (`assemble_heads`) before anything is written to its cache.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist

from garrison_workers.errors import UnavailableError
from garrison_workers.faults import FaultPoints

log = logging.getLogger(__name__)


class KVTransferError(UnavailableError):
    """A transfer arrived short, malformed or corrupted; the request fails and both sides free its blocks."""


@dataclass(slots=True)
class KVPayload:
    """One TP shard of one sequence's KV cache: K and V as `[layers, tokens, kv_heads_of_shard, head_dim]`."""

    num_tokens: int
    head_start: int  # first KV head (of the model's total) this shard holds
    k_LTKD: torch.Tensor
    v_LTKD: torch.Tensor
    checksum: str | None = None  # sha256 of both tensors, set when the engine runs with checks on

    def digest(self) -> str:
        sha = hashlib.sha256()
        for t in (self.k_LTKD, self.v_LTKD):
            sha.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return sha.hexdigest()


class HeadShard(NamedTuple):
    """A rank taking part in a point-to-point transfer, and the KV heads it sends or needs."""

    rank: int  # in the channel's process group
    head_start: int
    num_heads: int

    def overlaps(self, other: HeadShard) -> bool:
        return (self.head_start < other.head_start + other.num_heads
                and other.head_start < self.head_start + self.num_heads)


@dataclass(frozen=True, slots=True)
class KVRoute:
    """One sequence's transfer over a channel: who sends which heads to whom, and what to expect.

    The senders are the prefill group's ranks holding distinct heads (ep_rank 0); the receivers are every
    rank of the decode group (EP ranks each hold all of their TP rank's heads). A sender sends to, and a
    receiver receives from, exactly the ranks whose heads overlap its own, so both sides agree on the
    messages. `tag` is unique within the channel's life and keeps the messages of transfers apart. `lane`:
    the channel's lane (an index into `LANES`) that carries it.
    """

    channel: str
    tag: int
    lane: int
    num_tokens: int
    num_layers: int
    head_dim: int
    senders: tuple[HeadShard, ...]
    receivers: tuple[HeadShard, ...]


class StagedKV(NamedTuple):
    """The handle of a transfer received over a channel in the background: what each receiving rank staged."""

    channel: str
    tag: int


class KVTransport(Protocol):
    """Moves one rank's TP shard of a sequence's KV to the ranks that need its heads.

    The driver calls `send` on every sending rank and `receive` on every receiving rank of one transfer.
    A transport either returns handles from `send` that the driver passes to `receive` once the sends are
    done (the object store; `route` may be None), or returns None and sends straight to the receivers along
    `route` (point-to-point): then each receiving rank has started receiving that route in the background
    (`TorchDistributedTransport.start_receive`), and the handles are one `StagedKV`.
    """

    def send(self, payload: KVPayload, route: KVRoute | None) -> Any: ...

    def receive(self, handles: list[Any]) -> list[KVPayload] | None:
        """The shards this rank needs; any of them may still be short or corrupt (see `assemble_heads`). None
        while they are still arriving (received in the background)."""
        ...

    def release(self, handles: list[Any]) -> None:
        """Forget what this rank holds for `handles` (its staged KV; the object store's references are the
        driver's to drop)."""
        ...


def _resolve(handle: Any) -> KVPayload:
    """Either transport's handle: a payload shipped by value, or a Ray object reference."""
    if isinstance(handle, KVPayload):
        return handle
    import ray

    return _from_wire(ray.get(handle))


# Ray serializes numpy arrays out of band (one copy into the object store, zero-copy reads) but
# pickles torch tensors through bytes: 40x slower for a 134 MB cache. So tensors travel as raw bytes.
_Wire = tuple[int, int, str, tuple[int, ...], Any, Any, "str | None"]


def _to_wire(payload: KVPayload) -> _Wire:
    k, v = payload.k_LTKD.contiguous(), payload.v_LTKD.contiguous()
    return (payload.num_tokens, payload.head_start, str(k.dtype).removeprefix("torch."), tuple(k.shape),
            k.view(torch.uint8).numpy(), v.view(torch.uint8).numpy(), payload.checksum)


def _from_wire(wire: _Wire) -> KVPayload:
    num_tokens, head_start, dtype, shape, k_bytes, v_bytes, checksum = wire
    with warnings.catch_warnings():  # the object store's arrays are read-only; they are only read from
        warnings.simplefilter("ignore", UserWarning)
        k, v = (torch.from_numpy(b).view(getattr(torch, dtype)).reshape(shape) for b in (k_bytes, v_bytes))
    return KVPayload(num_tokens, head_start, k, v, checksum)


class InProcessTransport:
    """The sender runs in the driver's process: the handle is the payload itself."""

    def __init__(self) -> None:
        # A sliced import receives the same handles once per slice: each is read from Ray's object store once (a
        # read costs about a millisecond however small the slice, and the import pace took it for copy time,
        # cutting 4k tokens into hundreds of slices) and kept until `release`.
        self._received: dict[Any, KVPayload] = {}

    def send(self, payload: KVPayload, route: KVRoute | None = None) -> Any:
        return payload

    def receive(self, handles: list[Any]) -> list[KVPayload]:
        for handle in handles:
            if not isinstance(handle, KVPayload) and handle not in self._received:
                self._received[handle] = _resolve(handle)
        return [h if isinstance(h, KVPayload) else self._received[h] for h in handles]

    def release(self, handles: list[Any]) -> None:
        for handle in handles:
            if not isinstance(handle, KVPayload):
                self._received.pop(handle, None)


class RayObjectStoreTransport(InProcessTransport):
    """Through Ray's object store: works between any two actors, on one node or across nodes."""

    def send(self, payload: KVPayload, route: KVRoute | None = None) -> Any:
        import ray

        return ray.put(_to_wire(payload))


# A shard's header on a point-to-point channel, sent before its K and V: int64 words, the sha256 digest last.
_MAGIC = 0x4B560001  # "KV", version 1
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)
_HEADER_WORDS = 13  # magic, num_tokens, head_start, 4 shape dims, dtype, has_checksum, 4 digest words


def _header(payload: KVPayload) -> torch.Tensor:
    k = payload.k_LTKD
    fields = [_MAGIC, payload.num_tokens, payload.head_start, *k.shape, _DTYPES.index(k.dtype),
              payload.checksum is not None]
    digest = bytearray.fromhex(payload.checksum) if payload.checksum is not None else bytearray(32)
    return torch.cat([torch.tensor(fields, dtype=torch.int64), torch.frombuffer(digest, dtype=torch.int64)])


@dataclass(slots=True)
class _Announced:
    """What a header says is coming: enough to allocate the receive buffers."""

    num_tokens: int
    head_start: int
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    checksum: str | None

    @property
    def nbytes(self) -> int:
        layers, tokens, heads, dim = self.shape
        return layers * tokens * heads * dim * self.dtype.itemsize


def _read_header(header: torch.Tensor, source: HeadShard, route: KVRoute) -> _Announced:
    """Refuses a header whose buffers would not be bounded by the route: the K and V are then never received
    (the sender's sends time out), since receiving more bytes than posted aborts the receiving process."""
    words = header.cpu().tolist()
    magic, num_tokens, head_start, layers, tokens, heads, dim, dtype, has_checksum = words[:9]
    if (magic != _MAGIC or not 0 <= dtype < len(_DTYPES) or (layers, dim) != (route.num_layers, route.head_dim)
            or not 0 < tokens <= route.num_tokens or not 0 < heads <= source.num_heads):
        bound = [route.num_layers, route.num_tokens, source.num_heads, route.head_dim]
        raise KVTransferError(f"KV transfer header from channel rank {source.rank} announces K and V of shape "
                              f"{[layers, tokens, heads, dim]}, not at most {bound}; refused before receiving them")
    checksum = header[9:].cpu().numpy().tobytes().hex() if has_checksum else None
    return _Announced(num_tokens, head_start, (layers, tokens, heads, dim), _DTYPES[dtype], checksum)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


# A channel's lanes: a process group and a thread each, on every member. A lane posts its transfers one at a
# time in the order the driver started them, so both sides agree on the order of messages (NCCL matches a
# pair's messages by it). Transfers of up to EXPRESS_BYTES go on the express lane, longer ones on the bulk
# lane: a short prompt's KV never waits behind a long prompt's (a gigabyte or more at a million tokens).
LANES = ("express", "bulk")
EXPRESS_BYTES = 16 << 20


@dataclass(slots=True)
class _Lane:
    group: Any  # the lane's process group
    rank: int  # this rank in the channel
    thread: ThreadPoolExecutor


class TorchDistributedTransport:
    """Point-to-point over torch.distributed: each KV channel is a process group of a prefill group's ranks and
    a decode group's, built from its own TCPStore, apart from the rank's own (default) process group.

    Sends and receives run on the threads of the channel's lanes, so the rank's steps go on meanwhile: `send`
    returns at once (the payload is already a copy of the blocks, which may be reused), and `start_receive`
    stages the shards for `receive(StagedKV)`, which says None until they are in. A sender's failure is logged
    here; the receiver reports it (its receive fails or times out), and the driver reopens the channel.

    gloo when the KV cache is on the CPU; NCCL when it is on a GPU: the same calls on device tensors. The NCCL
    path has not run yet (no GPU where this was written): NCCL ignores tags and matches a pair's messages in
    the order posted, which holds here (header, K, V on both sides; one transfer at a time per lane), and
    its waits only order the GPU stream, hence the synchronize; a timeout there may abort the process (torch's
    NCCL watchdog) instead of failing one transfer. Staged shards take device memory until imported.
    """

    def __init__(self, device: torch.device, timeout: timedelta, faults: FaultPoints | None = None) -> None:
        self.device, self.timeout = device, timeout
        self.faults = faults or FaultPoints()
        self._channels: dict[str, list[_Lane]] = {}  # name -> its lanes
        self._staged: dict[StagedKV, Future[list[KVPayload]]] = {}

    def join(self, channel: str, host: str, port: int, rank: int, size: int) -> None:
        """Join a channel (replacing an older group of that name); every member calls this at the same time."""
        for old in self._channels.pop(channel, []):  # a transfer stuck on an old group times out on its own thread
            old.thread.shutdown(wait=False, cancel_futures=True)
        try:
            store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=self.timeout)
            groups = [self._process_group(dist.PrefixStore(lane, store), rank, size) for lane in LANES]
        except RuntimeError as err:  # a member missing or gone: this rank stays healthy, the channel is not open
            raise KVTransferError(f"could not join KV channel {channel!r} as rank {rank} of {size}: {err}") from None
        self._channels[channel] = [_Lane(group, rank, ThreadPoolExecutor(1, thread_name_prefix=f"{channel}-{lane}"))
                                   for group, lane in zip(groups, LANES)]

    def _process_group(self, store: dist.Store, rank: int, size: int) -> Any:
        if self.device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            return dist.ProcessGroupNCCL(store, rank, size, options)
        return dist.ProcessGroupGloo(store, rank, size, self.timeout)

    def send(self, payload: KVPayload, route: KVRoute | None) -> None:
        self.post_send(payload, route).add_done_callback(_log_failed_send)

    def post_send(self, payload: KVPayload, route: KVRoute | None) -> Future[None]:
        """Send this rank's shard along `route` on the channel's thread."""
        lane, me = self._member(route, "senders")
        assert route is not None
        return lane.thread.submit(self._send, lane.group, me, payload, route)

    def start_receive(self, route: KVRoute) -> None:
        """Start receiving the shards this rank needs along `route`; `receive([StagedKV(...)])` takes them."""
        self._staged[StagedKV(route.channel, route.tag)] = self.post_receive(route)

    def post_receive(self, route: KVRoute | None) -> Future[list[KVPayload]]:
        """Receive the shards this rank needs along `route` on the channel's thread."""
        lane, me = self._member(route, "receivers")
        assert route is not None
        return lane.thread.submit(self._receive, lane.group, me, route)

    def receive(self, handles: list[Any]) -> list[KVPayload] | None:
        [handle] = handles
        arriving = self._staged.get(handle)
        if arriving is None:
            raise KVTransferError(f"this rank has no KV staged for {handle}: it was released; the transfer must "
                                  "start again")
        if not arriving.done():
            return None
        if arriving.cancelled():
            del self._staged[handle]
            raise KVTransferError(f"the KV channel {handle.channel!r} was reopened before {handle} was received; "
                                  "the transfer must start again")
        error = arriving.exception()
        if error is not None:
            del self._staged[handle]
            raise error
        return arriving.result()

    def release(self, handles: list[Any]) -> None:
        for handle in handles:
            self._staged.pop(handle, None)  # one still arriving is dropped when its thread is done with it

    def _member(self, route: KVRoute | None, side: str) -> tuple[_Lane, HeadShard]:
        if route is None or route.channel not in self._channels:
            raise KVTransferError(f"this rank is not in KV channel {getattr(route, 'channel', None)!r}; open the "
                                  "channel (kv_link.TorchChannel) before transferring over it")
        lane = self._channels[route.channel][route.lane]
        return lane, next(s for s in getattr(route, side) if s.rank == lane.rank)

    def _send(self, group: Any, me: HeadShard, payload: KVPayload, route: KVRoute) -> None:
        self.faults.hit("send")
        messages = (_header(payload).to(self.device), _as_bytes(payload.k_LTKD.to(self.device)),
                    _as_bytes(payload.v_LTKD.to(self.device)))
        works = [group.send([message], peer.rank, route.tag + i)
                 for peer in route.receivers if peer.overlaps(me) for i, message in enumerate(messages)]
        self._wait(works, f"sending heads {me.head_start}..{me.head_start + me.num_heads - 1}")

    def _receive(self, group: Any, me: HeadShard, route: KVRoute) -> list[KVPayload]:
        sources = [s for s in route.senders if s.overlaps(me)]
        headers = [torch.empty(_HEADER_WORDS, dtype=torch.int64, device=self.device) for _ in sources]
        self._wait([group.recv([h], s.rank, route.tag) for h, s in zip(headers, sources)], "receiving headers")
        announced = [_read_header(h, s, route) for h, s in zip(headers, sources)]
        buffers = [(torch.empty(a.nbytes, dtype=torch.uint8, device=self.device),
                    torch.empty(a.nbytes, dtype=torch.uint8, device=self.device)) for a in announced]
        self._wait([group.recv([buffer], s.rank, route.tag + i) for (k, v), s in zip(buffers, sources)
                    for i, buffer in ((1, k), (2, v))], "receiving K and V")
        return [KVPayload(a.num_tokens, a.head_start, k.view(a.dtype).view(a.shape), v.view(a.dtype).view(a.shape),
                          a.checksum) for a, (k, v) in zip(announced, buffers)]

    def _wait(self, works: list[Any], what: str) -> None:
        deadline = time.monotonic() + self.timeout.total_seconds()
        try:
            for work in works:
                work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        except RuntimeError as err:  # a timeout, or a peer gone: the channel must be reopened before its next use
            raise KVTransferError(f"KV transfer failed {what}: {err}") from None


def _log_failed_send(sent: Future[None]) -> None:
    if not sent.cancelled() and sent.exception() is not None:
        log.warning("%s", sent.exception())


def assemble_heads(payloads: list[KVPayload], num_tokens: int, num_kv_heads: int, head_start: int, head_count: int,
                   tokens: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Check every shard, then cut heads [head_start, head_start + head_count) of `tokens` out of their union.

    The shards must tile, without gaps or overlaps, a run of heads holding the wanted ones: every head of
    the model (the object store delivers every shard) or only the shards that overlap (point-to-point).
    Shapes are checked whole for every slice of tokens; checksums (which read every byte) with the first.
    """
    covered = sorted((p.head_start, p.head_start + p.k_LTKD.shape[2]) for p in payloads)
    end = head_start + head_count
    tiled = all(prev_end == first for (_, prev_end), (first, _) in itertools.pairwise(covered))
    if not covered or not tiled or covered[0][0] > head_start or not end <= covered[-1][1] <= num_kv_heads:
        raise KVTransferError(f"KV transfer shards cover heads {covered}, which do not tile heads {head_start}..{end} "
                              f"(of {num_kv_heads}) without gaps or overlaps")
    for payload in payloads:
        if payload.num_tokens != num_tokens or payload.k_LTKD.shape[1] != num_tokens \
                or payload.k_LTKD.shape != payload.v_LTKD.shape:
            raise KVTransferError(f"KV transfer shard holds {payload.k_LTKD.shape[1]} tokens (says {payload.num_tokens}), "
                                  f"expected {num_tokens}; nothing is decoded from a partial cache")
        if payload.checksum is not None and not tokens.start and payload.digest() != payload.checksum:
            raise KVTransferError(f"KV transfer shard for heads from {payload.head_start} fails its checksum")
    ordered = sorted(payloads, key=lambda p: p.head_start)
    first = ordered[0].head_start
    if len(ordered) == 1 and (first, covered[0][1]) == (head_start, end):  # the shard is exactly the heads wanted
        return ordered[0].k_LTKD[:, tokens], ordered[0].v_LTKD[:, tokens]
    k = torch.cat([p.k_LTKD[:, tokens] for p in ordered], dim=2)[:, :, head_start - first:end - first]
    v = torch.cat([p.v_LTKD[:, tokens] for p in ordered], dim=2)[:, :, head_start - first:end - first]
    return k, v
