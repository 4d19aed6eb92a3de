"""Client streams of the load test, and a process that runs some of them (`python load_clients.py < spec.json`).

Each tenant is an application of its own: the backlogged tenants' clients run in processes of their own, so that
what the quiet tenant sees measures the server, not an event loop and an interpreter it shares with 140 other
streams. Times are `time.monotonic()`, one clock for every process on the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import grpc

from garrison.v1 import inference_pb2 as pb
from garrison.v1 import inference_pb2_grpc

MODEL = "tiny"
VOCAB = 320  # save_tiny_llama's
PROMPT_TOKENS = 8
MAX_TOKENS = 32
QUIET_MAX_TOKENS = 8
QUIET_PAUSE_S = 0.3  # mean pause between a quiet stream's requests
RETRY_S = 0.25
CANCEL_AFTER_TOKENS = 4
QUEUED_CANCEL_S = 0.3


@dataclass(slots=True)
class Tenant:
    name: str
    key: str
    may_be_refused: bool = False
    cancels_queued: bool = False

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)


@dataclass(slots=True)
class Tally:
    """What one tenant's clients saw."""

    tokens: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens) per response
    ttfts: list[tuple[float, float]] = field(default_factory=list)  # (call start, seconds to first token)
    completed: int = 0
    refused: int = 0
    cancelled: int = 0
    failures: list[str] = field(default_factory=list)

    def tokens_between(self, start: float, end: float) -> int:
        return sum(n for at, n in self.tokens if start <= at < end)

    def ttfts_within(self, *windows: tuple[float, float]) -> list[float]:
        return [ttft for at, ttft in self.ttfts if any(start <= at < end for start, end in windows)]

    def add(self, other: Tally) -> None:
        self.tokens += other.tokens
        self.ttfts += other.ttfts
        self.completed, self.refused = self.completed + other.completed, self.refused + other.refused
        self.cancelled += other.cancelled
        self.failures += other.failures


async def one_call(stub: inference_pb2_grpc.InferenceStub, tenant: Tenant, tally: Tally, rng: random.Random,
                   max_tokens: int, cancel_after_tokens: int | None = None,
                   cancel_after_s: float | None = None) -> bool:
    """One Generate call, tallied; False if it was refused by a quota."""
    prompt = [rng.randrange(3, VOCAB) for _ in range(PROMPT_TOKENS)]
    call = stub.Generate(pb.GenerateRequest(model=MODEL, token_ids=prompt, max_tokens=max_tokens),
                         metadata=tenant.metadata)
    timer = asyncio.get_running_loop().call_later(cancel_after_s, call.cancel) if cancel_after_s else None
    started, received = time.monotonic(), 0
    try:
        async for response in call:
            now = time.monotonic()
            if received == 0:
                tally.ttfts.append((started, now - started))
            received += len(response.token_ids)
            tally.tokens.append((now, len(response.token_ids)))
            if cancel_after_tokens is not None and received >= cancel_after_tokens:
                call.cancel()
                break
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():  # the run is over: this stream stops
            raise
        # else our own timer cancelled the call: grpc.aio ends the iteration this way
    except grpc.aio.AioRpcError as err:
        if (tenant.may_be_refused and err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                and "max_concurrent_requests" in (err.details() or "")):
            tally.refused += 1
            return False
        tally.failures.append(f"{err.code().name}: {err.details()}")
        return True
    finally:
        if timer is not None:
            timer.cancel()
    if call.cancelled():
        tally.cancelled += 1
    elif received != max_tokens:  # the model has no EOS: every finished stream carries all its tokens
        tally.failures.append(f"stream ended OK after {received} of {max_tokens} tokens")
    else:
        tally.completed += 1
    return True


async def backlogged_stream(stub: inference_pb2_grpc.InferenceStub, tenant: Tenant, tally: Tally, seed: str) -> None:
    """Send back to back for as long as the run lasts; retry a refused call after RETRY_S."""
    rng = random.Random(seed)
    for number in itertools.count(1):
        admitted = await one_call(
            stub, tenant, tally, rng, MAX_TOKENS,
            cancel_after_tokens=CANCEL_AFTER_TOKENS if number % 10 == 0 else None,
            cancel_after_s=QUEUED_CANCEL_S if tenant.cancels_queued and number % 10 == 5 else None)
        if not admitted:
            await asyncio.sleep(RETRY_S)


async def quiet_stream(stub: inference_pb2_grpc.InferenceStub, tenant: Tenant, tally: Tally, seed: str) -> None:
    rng = random.Random(seed)
    while True:
        await asyncio.sleep(rng.uniform(0.5, 1.5) * QUIET_PAUSE_S)
        await one_call(stub, tenant, tally, rng, QUIET_MAX_TOKENS)


async def cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Stop client streams where they stand: each open call is cancelled by its client."""
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    crashed = [r for r in results if not isinstance(r, asyncio.CancelledError)]
    assert not crashed, f"client streams crashed: {crashed[:3]}"


async def run_backlogged(address: str, tenants: list[tuple[Tenant, int, int]], seconds: float) -> dict[str, Tally]:
    """Backlogged streams `first..count-1` of each tenant (a channel each: one application each) for `seconds`."""
    channels = {tenant.name: grpc.aio.insecure_channel(address) for tenant, _, _ in tenants}
    tallies = {tenant.name: Tally() for tenant, _, _ in tenants}
    tasks = [asyncio.create_task(backlogged_stream(inference_pb2_grpc.InferenceStub(channels[tenant.name]), tenant,
                                                   tallies[tenant.name], seed=f"{tenant.name}-{i}"))
             for tenant, first, count in tenants for i in range(first, count)]
    await asyncio.sleep(seconds)
    await cancel(tasks)
    for channel in channels.values():
        await channel.close()
    await asyncio.sleep(0.2)  # grpc delivers the channels' last events to this loop: let them land before it closes
    return tallies


def main() -> None:
    """Read {address, seconds, tenants: [[tenant fields, first, count]]}; print "ready", run, print the tallies."""
    spec = json.loads(sys.stdin.readline())
    tenants = [(Tenant(**fields), first, count) for fields, first, count in spec["tenants"]]
    print("ready", flush=True)
    tallies = asyncio.run(run_backlogged(spec["address"], tenants, spec["seconds"]))
    print(json.dumps({name: asdict(tally) for name, tally in tallies.items()}), flush=True)


if __name__ == "__main__":
    main()
