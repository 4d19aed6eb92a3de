"""Tenant limits that hold across every gateway of a cluster: one enforcer in a named Ray actor, leases per gateway.

`max_concurrent_requests` and `tokens_per_minute` are per tenant, not per gateway: with N gateways behind a load
balancer, limits kept in each gateway would let a tenant use N times its share. So every gateway of a cluster
admits through one `QuotaEnforcer` (garrison.tenancy.limits, the same arithmetic) in a named, detached Ray actor,
`limits` in the deployment's namespace: one call to admit (about a millisecond), and a release sent without
waiting. A gateway renews its leases every `RENEW_S`; the leases of a gateway silent for `LEASE_TTL_S` (it died,
or lost the cluster) are released as if each request had generated every token it reserved, so a dead gateway
holds a tenant's slots for at most `LEASE_TTL_S` seconds. If the actor itself is lost, a new one starts empty:
for up to a minute a tenant may be admitted what its old window had already charged. An admission the actor does
not answer within `ADMIT_TIMEOUT_S` (it restarts, or the cluster is gone: Ray's call would wait for ever) is
refused with UNAVAILABLE, to be retried.

`LocalQuotas` is the same interface over an enforcer in this process: one gateway (garrison serve on a machine).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Protocol

from garrison.tenancy.limits import Lease, QuotaEnforcer
from garrison.tenancy.records import Quota
from garrison_workers.errors import UnavailableError

log = logging.getLogger(__name__)

LIMITS_ACTOR = "limits"
RENEW_S = 1.0
LEASE_TTL_S = 5.0
ADMIT_TIMEOUT_S = 10.0


class AdmitLease(Protocol):
    def release(self, output_tokens: int) -> bool: ...


class Quotas(Protocol):
    async def admit(self, tenant: str, quota: Quota, prompt_tokens: int, max_new_tokens: int) -> AdmitLease: ...

    def total_in_flight(self) -> int: ...

    async def stop(self) -> None: ...


class LocalQuotas:
    def __init__(self, enforcer: QuotaEnforcer | None = None) -> None:
        self.enforcer = enforcer or QuotaEnforcer()

    async def admit(self, tenant: str, quota: Quota, prompt_tokens: int, max_new_tokens: int) -> Lease:
        return self.enforcer.admit(tenant, quota, prompt_tokens, max_new_tokens)

    def total_in_flight(self) -> int:
        return self.enforcer.total_in_flight()

    async def stop(self) -> None:
        pass


class LimitsActor:
    """The body of the `limits` actor: the cluster's enforcer and which gateway holds each lease."""

    def __init__(self) -> None:
        self.enforcer = QuotaEnforcer()
        self._leases: dict[int, tuple[str, Lease]] = {}
        self._seen: dict[str, float] = {}
        self._ids = itertools.count()

    def admit(self, gateway: str, tenant: str, quota: Quota, prompt_tokens: int, max_new_tokens: int) -> int:
        """A lease id, or the QuotaExceededError / RequestTooLargeError that refused the request."""
        self._expire()
        self._seen[gateway] = time.monotonic()
        lease = self.enforcer.admit(tenant, quota, prompt_tokens, max_new_tokens)
        lease_id = next(self._ids)
        self._leases[lease_id] = (gateway, lease)
        return lease_id

    def release(self, lease_id: int, output_tokens: int) -> None:
        held = self._leases.pop(lease_id, None)
        if held is not None:
            held[1].release(output_tokens)

    def renew(self, gateway: str) -> None:
        self._seen[gateway] = time.monotonic()
        self._expire()

    def total_in_flight(self) -> int:
        self._expire()
        return self.enforcer.total_in_flight()

    def _expire(self) -> None:
        cutoff = time.monotonic() - LEASE_TTL_S
        gone = {gateway for gateway, seen in self._seen.items() if seen < cutoff}
        if not gone:
            return
        for lease_id, (gateway, lease) in list(self._leases.items()):
            if gateway in gone:
                del self._leases[lease_id]
                lease.release(lease.max_new_tokens)  # it may have generated all it reserved: charge that
        for gateway in gone:
            del self._seen[gateway]
        log.warning("gateways %s stopped renewing their leases; released them", ", ".join(sorted(gone)))


def limits_actor(namespace: str) -> Any:
    """The cluster's limits actor, started by whoever asks first (the controller, or a gateway)."""
    import ray

    from garrison_workers.placement import on_head_node

    return ray.remote(LimitsActor).options(name=LIMITS_ACTOR, namespace=namespace, lifetime="detached",
                                           get_if_exists=True, num_cpus=0, max_restarts=-1,
                                           scheduling_strategy=on_head_node()).remote()


class _SharedLease:
    __slots__ = ("_actor", "_id", "_released")

    def __init__(self, actor: Any, lease_id: int) -> None:
        self._actor, self._id, self._released = actor, lease_id, False

    def release(self, output_tokens: int) -> bool:
        if self._released:
            return False
        self._released = True
        self._actor.release.remote(self._id, output_tokens)  # not waited for: the next admission sees it
        return True


class SharedQuotas:
    """A gateway's side of the cluster's limits: admits through the actor, and renews this gateway's leases."""

    def __init__(self, namespace: str, gateway: str) -> None:
        self.actor, self.gateway = limits_actor(namespace), gateway
        self._task: asyncio.Task[None] | None = None

    def start(self) -> "SharedQuotas":
        self._task = asyncio.get_running_loop().create_task(self._renew())
        return self

    async def admit(self, tenant: str, quota: Quota, prompt_tokens: int, max_new_tokens: int) -> _SharedLease:
        import ray

        call = self.actor.admit.remote(self.gateway, tenant, quota, prompt_tokens, max_new_tokens)
        try:
            lease_id = await asyncio.wait_for(call, ADMIT_TIMEOUT_S)
        except ray.exceptions.RayTaskError as err:
            raise err.cause from None  # the enforcer's own refusal
        except (TimeoutError, ray.exceptions.RayError) as err:
            if isinstance(err, TimeoutError):  # a lease granted after all must not hold one of the tenant's slots
                call.future().add_done_callback(self._give_back_late)
            raise UnavailableError(f"the cluster's tenant limits did not answer ({type(err).__name__}); "
                                   f"retry") from None
        return _SharedLease(self.actor, lease_id)

    def total_in_flight(self) -> int:
        import ray

        return ray.get(self.actor.total_in_flight.remote())

    def _give_back_late(self, granted: Any) -> None:
        """Release a lease the actor granted after this gateway stopped waiting for it (it charges no tokens:
        nothing ran)."""
        if not granted.cancelled() and granted.exception() is None:
            self.actor.release.remote(granted.result(), 0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _renew(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.actor.renew.remote(self.gateway), LEASE_TTL_S)
            except Exception as err:  # the actor restarts (max_restarts): leases made before are gone with it
                log.warning("could not renew this gateway's leases (%s); retrying", type(err).__name__)
            await asyncio.sleep(RENEW_S)
