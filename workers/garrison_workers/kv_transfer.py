"""Moving a sequence's KV cache from a prefill group to a decode group.

The prefill side exports, per TP rank, the K and V of every layer for the sequence's tokens (its
share of the KV heads); the decode side imports into freshly allocated blocks, taking the heads its
own TP rank holds, so groups of different `tp` interoperate (heads are concatenated, then re-split).
Payloads travel through a `KVTransport`; Ray's object store is the CPU and cross-node one.
A torch.distributed point-to-point transport (NCCL on GPU) fits the same two calls; it needs a
process group spanning both groups and is left for GPU machines.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from garrison_workers.errors import GarrisonError


class KVTransferError(GarrisonError):
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


class KVTransport(Protocol):
    def send(self, payload: KVPayload) -> Any:
        """Make the payload available to the receiver; returns a handle the driver passes along."""
        ...

    def receive(self, handle: Any) -> KVPayload: ...


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

    def send(self, payload: KVPayload) -> Any:
        return payload

    def receive(self, handle: Any) -> KVPayload:
        return _resolve(handle)


class RayObjectStoreTransport:
    """Through Ray's object store: works between any two actors, on one node or across nodes."""

    def send(self, payload: KVPayload) -> Any:
        import ray

        return ray.put(_to_wire(payload))

    def receive(self, handle: Any) -> KVPayload:
        return _resolve(handle)


def assemble_heads(payloads: list[KVPayload], num_tokens: int, num_kv_heads: int, head_start: int, head_count: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Check every shard, then cut heads [head_start, head_start + head_count) out of their union."""
    covered = sorted((p.head_start, p.head_start + p.k_LTKD.shape[2]) for p in payloads)
    next_head = 0
    for first, end in covered:
        if first != next_head:
            raise KVTransferError(f"KV transfer shards cover heads {covered}, not exactly 0..{num_kv_heads}")
        next_head = end
    if next_head != num_kv_heads:
        raise KVTransferError(f"KV transfer shards cover heads {covered}, not exactly 0..{num_kv_heads}")
    for payload in payloads:
        if payload.num_tokens != num_tokens or payload.k_LTKD.shape[1] != num_tokens \
                or payload.k_LTKD.shape != payload.v_LTKD.shape:
            raise KVTransferError(f"KV transfer shard holds {payload.k_LTKD.shape[1]} tokens (says {payload.num_tokens}), "
                                  f"expected {num_tokens}; nothing is decoded from a partial cache")
        if payload.checksum is not None and payload.digest() != payload.checksum:
            raise KVTransferError(f"KV transfer shard for heads from {payload.head_start} fails its checksum")
    ordered = sorted(payloads, key=lambda p: p.head_start)
    if len(ordered) == 1 and head_start == 0 and head_count == num_kv_heads:  # same tp on both sides: no copy
        return ordered[0].k_LTKD, ordered[0].v_LTKD
    k = torch.cat([p.k_LTKD for p in ordered], dim=2)[:, :, head_start:head_start + head_count]
    v = torch.cat([p.v_LTKD for p in ordered], dim=2)[:, :, head_start:head_start + head_count]
    return k, v
