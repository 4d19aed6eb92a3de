"""The router on its own: fake replicas (no engine, no threads), one event loop."""

from __future__ import annotations

import asyncio

from garrison.router.router import Deployment, RouteRequest, Router
from garrison_workers.engine.llm_engine import RequestOutput
from garrison_workers.engine.sequence import SamplingParams

MODEL = "m"


class FakeReplica:
    """Takes requests and emits nothing until told: a test decides when each one streams or ends."""

    kv_blocks = (0, 0)

    def __init__(self) -> None:
        self.sinks: dict[str, object] = {}
        self.aborted: list[str] = []

    def add(self, request_id, prompt_token_ids, params, salt, sink, on_start=None) -> None:
        self.sinks[request_id] = sink

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def finish(self, request_id: str) -> None:
        self.sinks.pop(request_id)(RequestOutput(request_id, [7], "", [None], True, "length", 1, 1, 0))


def router_with_one_slot() -> tuple[Router, FakeReplica]:
    replica = FakeReplica()
    return Router([Deployment(MODEL, None, None, [replica], slots_per_replica=1, max_model_len=64)]), replica  # type: ignore[arg-type, list-item]


def request(request_id: str, tenant: str = "t") -> RouteRequest:
    return RouteRequest(request_id, tenant, 1.0, MODEL, [1], SamplingParams(max_tokens=1), b"")


async def consume(router: Router, route: RouteRequest) -> list[RequestOutput]:
    return [out async for out in router.stream(route)]


async def until(condition, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


def test_a_queued_request_cancelled_as_a_slot_frees_is_skipped_not_dispatched() -> None:
    """Cancelling a task cancels the future it awaits at once, but its `finally` (which withdraws the
    ticket from the queue) runs only at the task's next step. A slot freed in between must skip that
    ticket, not dispatch it (set_result on a cancelled future raised, and the slot was lost)."""

    async def scenario() -> None:
        router, replica = router_with_one_slot()
        running = asyncio.create_task(consume(router, request("running")))
        await until(lambda: "running" in replica.sinks)
        queued = asyncio.create_task(consume(router, request("queued")))
        await until(lambda: router.load(MODEL).queued == 1)
        running.cancel()  # its finally frees the slot and dispatches...
        queued.cancel()  # ...while this ticket, already cancelled, still sits in the queue
        results = await asyncio.gather(running, queued, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        assert replica.aborted == ["running"]
        load = router.load(MODEL)
        assert (load.in_flight, load.queued, load.in_flight_by_tenant) == (0, 0, {})
        later = asyncio.create_task(consume(router, request("later")))  # the slot is really free
        await until(lambda: "later" in replica.sinks)
        replica.finish("later")
        assert [out.finish_reason for out in await later] == ["length"]

    asyncio.run(scenario())
