"""The cluster's limits actor seen from a gateway (SharedQuotas), on a real local Ray instance."""

from __future__ import annotations

import asyncio

import pytest

from conftest import wait_until
from garrison.tenancy import shared_limits
from garrison.tenancy.records import Quota
from garrison.tenancy.shared_limits import SharedQuotas
from garrison_workers.errors import UnavailableError


def test_an_admission_the_actor_answers_too_late_is_refused_and_its_lease_given_back(local_ray, monkeypatch) -> None:
    """A gateway that stops waiting for the actor answers UNAVAILABLE; a lease the actor granted meanwhile goes
    back, or it would hold one of the tenant's max_concurrent_requests slots for as long as the gateway lives."""
    quotas = SharedQuotas("test-late-admission", "gateway-a")
    quota = Quota(tenant="t", max_concurrent_requests=1)

    async def main() -> None:
        lease = await quotas.admit("t", quota, 4, 4)  # the actor is up and answers
        lease.release(4)
        wait_until(lambda: quotas.total_in_flight() == 0, 10)
        monkeypatch.setattr(shared_limits, "ADMIT_TIMEOUT_S", 0.0)  # every answer now comes too late
        with pytest.raises(UnavailableError, match="did not answer"):
            await quotas.admit("t", quota, 4, 4)
        monkeypatch.setattr(shared_limits, "ADMIT_TIMEOUT_S", 10.0)
        wait_until(lambda: quotas.total_in_flight() == 0, 10)
        lease = await quotas.admit("t", quota, 4, 4)  # the tenant's one slot is free again
        lease.release(4)

    asyncio.run(main())
