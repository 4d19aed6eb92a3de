"""Weighted fair queueing on its own: no server, no asyncio."""

from __future__ import annotations

from collections import Counter

import pytest

from garrison_workers.engine.fair_queue import FairQueue


def test_backlogged_tenants_are_served_in_proportion_to_their_weights() -> None:
    queue: FairQueue[tuple[str, int]] = FairQueue()
    for i in range(300):
        queue.push("heavy", ("heavy", i), cost=10, weight=2.0)
        queue.push("light", ("light", i), cost=10, weight=1.0)
    served = Counter(queue.pop()[0] for _ in range(150))
    assert served["heavy"] == 100 and served["light"] == 50


def test_a_quiet_tenant_is_served_next_even_behind_a_flood() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(1000):
        queue.push("flood", f"flood-{i}", cost=100, weight=1.0)
    for _ in range(10):
        queue.pop()
    queue.push("quiet", "quiet-0", cost=100, weight=1.0)
    assert [queue.pop() for _ in range(2)].count("quiet-0") == 1
    assert queue.queued("flood") == 1000 - 12 + 1 and queue.queued("quiet") == 0


def test_cost_is_what_is_shared_not_the_number_of_requests() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(100):
        queue.push("big", f"big-{i}", cost=1000, weight=1.0)
        queue.push("small", f"small-{i}", cost=100, weight=1.0)
    served = Counter(queue.pop().partition("-")[0] for _ in range(55))
    assert served["small"] == 50 and served["big"] == 5  # equal tokens: ten small requests per big one


def test_removed_items_are_never_popped_and_counts_stay_true() -> None:
    queue: FairQueue[object] = FairQueue()
    items = [object() for _ in range(5)]
    for item in items:
        queue.push("t", item, cost=1, weight=1)
    assert queue.remove(items[1]) and not queue.remove(items[1])
    assert len(queue) == 4 and queue.queued("t") == 4
    assert [queue.pop() for _ in range(4)] == [items[0], *items[2:]]
    with pytest.raises(IndexError):
        queue.pop()
    assert len(queue) == 0 and queue.queued("t") == 0
    with pytest.raises(ValueError):
        queue.push("t", object(), cost=0, weight=1)


def test_requests_withdrawn_while_queued_cost_their_tenant_nothing() -> None:
    """A client that gives up on a queued request (cancels, times out) must not be charged for it,
    or a tenant whose clients cancel while waiting gets less than its share of what it does run."""
    queue: FairQueue[tuple[str, int]] = FairQueue()
    cancels = [("cancels", i) for i in range(200)]
    for i in range(200):
        queue.push("cancels", cancels[i], cost=10, weight=1.0)
        queue.push("waits", ("waits", i), cost=10, weight=1.0)
    for item in [cancels[0], *cancels[1::2]]:  # the first was at the head of its tenant's line
        assert queue.remove(item)
    served = Counter(queue.pop()[0] for _ in range(100))
    assert served["cancels"] == served["waits"] == 50
