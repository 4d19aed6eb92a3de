"""The torch.distributed point-to-point KV transport: shards reach the ranks needing their heads; bad ones are refused.

Every channel member is a transport in this process (gloo), each with its channel's thread. The same transport
between Ray worker groups, driven by a DisaggregatedEngine, is tested in test_disagg.py.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch

from garrison_workers.kv_transfer import (HeadShard, KVPayload, KVRoute, KVTransferError, StagedKV,
                                          TorchDistributedTransport, assemble_heads)

LAYERS, TOKENS, HEADS, DIM = 3, 7, 4, 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def open_channel(size: int, timeout_s: float = 10.0) -> list[TorchDistributedTransport]:
    transports = [TorchDistributedTransport(torch.device("cpu"), timedelta(seconds=timeout_s)) for _ in range(size)]
    port = free_port()
    with ThreadPoolExecutor(size) as pool:  # joining blocks until every member has joined
        list(pool.map(lambda r: transports[r].join("test", "127.0.0.1", port, r, size), range(size)))
    return transports


def route(prefill_tp: int, decode_tp: int, tag: int = 0, num_tokens: int = TOKENS, lane: int = 0) -> KVRoute:
    """Channel ranks 0..prefill_tp-1 send, the next decode_tp ranks receive."""
    hp, hd = HEADS // prefill_tp, HEADS // decode_tp
    senders = tuple(HeadShard(r, r * hp, hp) for r in range(prefill_tp))
    receivers = tuple(HeadShard(prefill_tp + r, r * hd, hd) for r in range(decode_tp))
    return KVRoute("test", tag, lane, num_tokens, LAYERS, DIM, senders, receivers)


def full_kv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (LAYERS, TOKENS, HEADS, DIM)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def shard(k: torch.Tensor, v: torch.Tensor, start: int, count: int, checksum: bool = True) -> KVPayload:
    payload = KVPayload(k.shape[1], start, k[:, :, start:start + count].clone(), v[:, :, start:start + count].clone())
    payload.checksum = payload.digest() if checksum else None
    return payload


def transfer(transports: list[TorchDistributedTransport], r: KVRoute, payloads: dict[int, KVPayload]
             ) -> dict[int, list[KVPayload] | Exception | None]:
    """Every sender and receiver posted at once, as the driver starts them; each rank's result or error."""
    futures = {rank: transports[rank].post_send(payload, r) for rank, payload in payloads.items()}
    futures |= {s.rank: transports[s.rank].post_receive(r) for s in r.receivers}
    return {rank: f.exception() or f.result() for rank, f in futures.items()}  # type: ignore[misc]


@pytest.mark.parametrize("prefill_tp, decode_tp", [(1, 2), (2, 1), (2, 2), (4, 2)])
def test_each_decode_rank_gets_exactly_its_heads(prefill_tp: int, decode_tp: int) -> None:
    k, v = full_kv()
    r = route(prefill_tp, decode_tp)
    hp, hd = HEADS // prefill_tp, HEADS // decode_tp
    payloads = {s.rank: shard(k, v, s.head_start, hp) for s in r.senders}
    results = transfer(open_channel(prefill_tp + decode_tp), r, payloads)
    for receiver in r.receivers:
        payloads = results[receiver.rank]
        assert isinstance(payloads, list)
        # Only the overlapping shards travel: a decode rank never receives heads it does not hold.
        assert len(payloads) == max(1, hd // hp)
        got_k, got_v = assemble_heads(payloads, TOKENS, HEADS, receiver.head_start, hd)
        assert torch.equal(got_k, k[:, :, receiver.head_start:receiver.head_start + hd])
        assert torch.equal(got_v, v[:, :, receiver.head_start:receiver.head_start + hd])
    assert all(results[s.rank] is None for s in r.senders)


def test_transfers_with_distinct_tags_share_a_channel() -> None:
    """Posted back to back, before any has arrived (as handovers overlap): each arrives whole, in order."""
    transports = open_channel(2)
    kvs = {tag: full_kv(seed) for tag, seed in ((0, 1), (3, 2), (6, 3))}
    sent = [transports[0].post_send(shard(k, v, 0, HEADS, checksum=False), route(1, 1, tag))
            for tag, (k, v) in kvs.items()]
    received = {tag: transports[1].post_receive(route(1, 1, tag)) for tag in kvs}
    assert [s.result() for s in sent] == [None] * 3
    for tag, (k, v) in kvs.items():
        [payload] = received[tag].result()
        assert payload.checksum is None and torch.equal(payload.k_LTKD, k) and torch.equal(payload.v_LTKD, v)


def test_a_short_transfer_passes_a_long_one_on_the_express_lane() -> None:
    """A long prompt's transfer occupies the bulk lane (here: its receiver is not there yet); a short one
    started after it arrives meanwhile on the express lane, and the long one arrives once received."""
    transports = open_channel(2)
    k, v = full_kv()
    long_sent = transports[0].post_send(shard(k, v, 0, HEADS), route(1, 1, tag=0, lane=1))
    short = route(1, 1, tag=3, lane=0)
    short_sent = transports[0].post_send(shard(k, v, 0, HEADS), short)
    [payload] = transports[1].post_receive(short).result(timeout=5)
    assert torch.equal(payload.k_LTKD, k) and short_sent.result(timeout=5) is None and not long_sent.done()
    [payload] = transports[1].post_receive(route(1, 1, tag=0, lane=1)).result(timeout=5)
    assert torch.equal(payload.v_LTKD, v) and long_sent.result(timeout=5) is None


def test_staged_receive_is_polled_without_waiting() -> None:
    """The receiving rank starts a receive and goes on: `receive` says None until the KV is in (however late the
    sender is), then gives it until released."""
    transports = open_channel(2)
    r = route(1, 1)
    staged = [StagedKV(r.channel, r.tag)]
    transports[1].start_receive(r)
    began = time.monotonic()
    assert transports[1].receive(staged) is None and time.monotonic() - began < 0.1
    k, v = full_kv()
    transports[0].send(shard(k, v, 0, HEADS), r)
    deadline = time.monotonic() + 10
    while (payloads := transports[1].receive(staged)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert payloads is not None and torch.equal(assemble_heads(payloads, TOKENS, HEADS, 0, HEADS)[1], v)
    transports[1].release(staged)
    with pytest.raises(KVTransferError, match="no KV staged"):
        transports[1].receive(staged)


def test_failed_staged_receive_is_reported_once() -> None:
    transports = open_channel(2, timeout_s=0.5)
    r = route(1, 1)
    staged = [StagedKV(r.channel, r.tag)]
    transports[1].start_receive(r)  # no sender: times out on the channel's thread
    deadline = time.monotonic() + 10
    with pytest.raises(KVTransferError, match="receiving headers"):
        while transports[1].receive(staged) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    with pytest.raises(KVTransferError, match="no KV staged"):  # reported by the call that found it, then forgotten
        transports[1].receive(staged)


def test_short_shard_arrives_whole_and_is_refused() -> None:
    """A shard with fewer tokens than the route says is received as announced (both sides finish) and then
    refused by the same checks as the object store's; nothing is written from it."""
    k, v = full_kv()
    results = transfer(open_channel(2), route(1, 1), {0: shard(k[:, :5], v[:, :5], 0, HEADS)})
    assert results[0] is None
    payloads = results[1]
    assert isinstance(payloads, list) and payloads[0].k_LTKD.shape[1] == 5
    with pytest.raises(KVTransferError, match="holds 5 tokens"):
        assemble_heads(payloads, TOKENS, HEADS, 0, HEADS)


def test_corrupted_shard_fails_its_checksum() -> None:
    k, v = full_kv()
    payload = shard(k, v, 0, HEADS)
    payload.v_LTKD[1, 2, 3, 4] += 1.0  # changed after the checksum was taken
    payloads = transfer(open_channel(2), route(1, 1), {0: payload})[1]
    assert isinstance(payloads, list)
    with pytest.raises(KVTransferError, match="checksum"):
        assemble_heads(payloads, TOKENS, HEADS, 0, HEADS)


def test_header_beyond_the_route_is_refused_before_receiving() -> None:
    k, v = full_kv()
    long = torch.cat([k, k], dim=1), torch.cat([v, v], dim=1)  # twice the tokens the route allows
    results = transfer(open_channel(2, timeout_s=1.0), route(1, 1), {0: shard(*long, 0, HEADS)})
    assert isinstance(results[1], KVTransferError) and "refused before receiving" in str(results[1])
    assert isinstance(results[0], KVTransferError)  # the unreceived K and V time out on the sender


def test_missing_sender_times_out_as_a_transfer_error() -> None:
    transports = open_channel(2, timeout_s=1.0)
    with pytest.raises(KVTransferError, match="receiving headers"):
        transports[1].post_receive(route(1, 1)).result()


def test_rank_outside_the_channel_is_refused() -> None:
    transport = TorchDistributedTransport(torch.device("cpu"), timedelta(seconds=1))
    with pytest.raises(KVTransferError, match="not in KV channel 'test'"):
        transport.start_receive(route(1, 1))

