"""An engine core's admission on its own: which waiting request enters the engine next (no engine, no threads)."""

from __future__ import annotations

import pytest

from garrison_workers.engine.admission import Admission, Waiting
from garrison_workers.errors import QueueFullError


def waiting(request_id: str, tenant: str = "t") -> Waiting:
    return Waiting(request_id, tenant, 1.0, cost=10)


def admit_all(admission: Admission) -> list[str]:
    admitted = []
    while (next_one := admission.next()) is not None:
        admitted.append(next_one.request_id)
    return admitted


def test_a_request_withdrawn_while_it_waits_is_never_admitted() -> None:
    admission = Admission(slots=1, max_queued_per_tenant=8)
    admission.push(waiting("running"))
    assert admit_all(admission) == ["running"]
    admission.push(waiting("queued"))
    assert admission.done("queued") is not None and len(admission) == 0  # withdrawn: its client went away
    assert admission.done("running") is not None
    assert admit_all(admission) == [] and admission.running == 0
    admission.push(waiting("later"))
    assert admit_all(admission) == ["later"]  # the slot is really free


def test_a_light_tenant_is_admitted_at_once_while_two_others_fill_the_slots() -> None:
    """Eight slots, two kept back (a quarter) for light tenants: two backlogged tenants hold six and queue the rest;
    a third tenant's requests take the other two at once instead of waiting their turn, and its third waits like
    any other until one of its own finishes."""
    admission = Admission(slots=8, max_queued_per_tenant=64)
    for i in range(10):
        for tenant in "ab":
            admission.push(waiting(f"{tenant}{i}", tenant))
    assert len(admit_all(admission)) == 6 and len(admission) == 14
    for i in range(3):
        admission.push(waiting(f"light-{i}", "c"))
    assert admit_all(admission) == ["light-0", "light-1"]
    admission.done("light-0")
    assert admit_all(admission) == ["light-2"]
    admission.done("a0")  # a backlogged tenant's slot frees: the queue's fair order decides, as before
    [after] = admit_all(admission)
    assert after[0] in "ab"


def test_equal_tenants_share_the_slots_as_they_free() -> None:
    admission = Admission(slots=4, max_queued_per_tenant=64)
    for i in range(20):
        admission.push(waiting(f"x{i}", "x"))
        admission.push(waiting(f"y{i}", "y"))
    served = admit_all(admission)
    for _ in range(12):
        admission.done(served[-1])
        served += admit_all(admission)
    assert abs(sum(r.startswith("x") for r in served) - sum(r.startswith("y") for r in served)) <= 2


def test_a_tenants_queue_is_bounded() -> None:
    admission = Admission(slots=1, max_queued_per_tenant=2)
    for i in range(2):
        admission.push(waiting(f"r{i}"))
    with pytest.raises(QueueFullError, match="max_queued_per_tenant") as refused:
        admission.push(waiting("r2"))
    assert refused.value.retry_after_s > 0
    admission.push(waiting("other", tenant="u"))  # another tenant's line is its own


def test_a_lone_tenant_gets_every_slot() -> None:
    admission = Admission(slots=8, max_queued_per_tenant=64)
    for i in range(12):
        admission.push(waiting(f"r{i}"))
    assert len(admit_all(admission)) == 8
