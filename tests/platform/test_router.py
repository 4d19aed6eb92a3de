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
    serving = True

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


def test_a_light_tenant_is_dispatched_at_once_while_two_others_fill_the_slots() -> None:
    """Eight slots, two kept back (a quarter) for light tenants: two backlogged tenants hold six and queue the
    rest; a third tenant's requests take the other two at once instead of waiting their turn, and its third
    waits like any other."""

    async def scenario() -> None:
        replica = FakeReplica()
        router = Router([Deployment(MODEL, None, None, [replica], slots_per_replica=8, max_model_len=64)])  # type: ignore[arg-type, list-item]
        heavy = [asyncio.create_task(consume(router, request(f"{t}{i}", tenant=t))) for i in range(10) for t in "ab"]
        await until(lambda: router.load(MODEL).queued == 14)
        assert router.load(MODEL).in_flight == 6
        light = [asyncio.create_task(consume(router, request(f"light-{i}", tenant="c"))) for i in range(3)]
        await until(lambda: "light-1" in replica.sinks)
        await until(lambda: router.load(MODEL).queued == 15)  # the headroom is used: the third waits its turn
        assert "light-0" in replica.sinks and "light-2" not in replica.sinks
        replica.finish("light-0")
        assert [out.finish_reason for out in await light[0]] == ["length"]
        await until(lambda: "light-2" in replica.sinks)  # the next light one takes the slot it left
        for task in (*heavy, *light[1:]):
            task.cancel()
        await asyncio.gather(*heavy, *light[1:], return_exceptions=True)

    asyncio.run(scenario())
