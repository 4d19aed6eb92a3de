"""Admission against a tenant's limits, in memory, per gateway process.

`QuotaEnforcer.admit` checks and reserves in one step under one lock, so concurrent requests can
never together pass a limit that each alone would pass; it never blocks on I/O, so an asyncio
gateway may call it on the event loop. The limits are read from the `Quota` passed with each
request, so a quota change applies to the next request without restarting anything.

Tokens per minute is a sliding 60-second window of charges. Admission charges the request
`prompt_tokens + max_new_tokens` (the most it can use) at its admission time; `Lease.release`
settles that charge to `prompt_tokens + output_tokens` (what it used), still at its admission time.
So a tenant can never have more than its limit charged to any 60-second span of admissions, a
cancelled request gives back what it did not generate, and a request is charged to the minute it
was admitted even if it streams for longer. A request that alone needs more than a minute's
allowance is refused as too large (INVALID_ARGUMENT) rather than left to retry forever.

Per-request limits (max_prompt_tokens, max_new_tokens) raise RequestTooLargeError (INVALID_ARGUMENT:
retrying cannot help); rate and concurrency limits raise QuotaExceededError (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from garrison.tenancy.errors import InvalidArgumentError, QuotaExceededError, RequestTooLargeError
from garrison.tenancy.records import Quota

WINDOW_S = 60.0


@dataclass(slots=True)
class _Charge:
    """Tokens charged to the window at `time`; `expired` once it has left the window."""

    time: float
    tokens: int
    expired: bool = False


@dataclass(slots=True)
class _TenantState:
    in_flight: int = 0
    window: deque[_Charge] = field(default_factory=deque)
    window_tokens: int = 0  # invariant: sum of tokens of the charges in `window`


class Lease:
    """One admitted request's hold on its tenant's limits.

    Release it once the request ends for any reason (finished, failed, cancelled); a second release
    does nothing, so a cancellation handler and a completion path may both call it. Used as a
    context manager, a lease still held at exit is released as if every reserved token was generated.
    """

    __slots__ = ("tenant", "prompt_tokens", "max_new_tokens", "_enforcer", "_charge", "_released")

    def __init__(self, enforcer: QuotaEnforcer, tenant: str, prompt_tokens: int, max_new_tokens: int,
                 charge: _Charge | None) -> None:
        self.tenant = tenant
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self._enforcer = enforcer
        self._charge = charge
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self, output_tokens: int) -> bool:
        """Free the request's slot and settle its token charge; True if this call did it."""
        if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0:
            raise ValueError(f"output_tokens must be a non-negative integer, not {output_tokens!r}")
        return self._enforcer._release(self, output_tokens)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release(self.max_new_tokens)


class QuotaEnforcer:
    def __init__(self, *, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._tenants: dict[str, _TenantState] = {}

    def admit(self, tenant: str, quota: Quota, prompt_tokens: int, max_new_tokens: int) -> Lease:
        """Reserve a slot and `prompt_tokens + max_new_tokens` of the tenant's minute, or raise."""
        need = _check_request(tenant, quota, prompt_tokens, max_new_tokens)
        with self._lock:
            now = self._clock()
            state = self._tenants.get(tenant) or _TenantState()
            self._expire(state, now)
            if quota.max_concurrent_requests and state.in_flight >= quota.max_concurrent_requests:
                raise QuotaExceededError(
                    f"tenant {tenant!r} has {state.in_flight} requests in flight, its max_concurrent_requests: "
                    f"retry when one finishes", limit="max_concurrent_requests", retry_after_s=None)
            tpm = quota.tokens_per_minute
            if tpm and state.window_tokens + need > tpm:
                wait = self._wait_s(state, tpm - need, now)
                raise QuotaExceededError(
                    f"tenant {tenant!r} has {state.window_tokens} of its tokens_per_minute {tpm} charged in the "
                    f"last {self._window_s:g} s and this request reserves {need} (prompt + max new tokens): "
                    f"retry in {wait:.1f} s", limit="tokens_per_minute", retry_after_s=wait)
            charge = None
            if tpm:  # unlimited tenants keep no window, so their admission stays O(1)
                charge = _Charge(now, need)
                state.window.append(charge)
                state.window_tokens += need
            state.in_flight += 1
            self._tenants[tenant] = state
            return Lease(self, tenant, prompt_tokens, max_new_tokens, charge)

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            state = self._tenants.get(tenant)
            return state.in_flight if state else 0

    def tokens_in_window(self, tenant: str) -> int:
        """Tokens charged to the tenant's current window (in-flight requests at their reservation)."""
        with self._lock:
            state = self._tenants.get(tenant)
            if state is None:
                return 0
            self._expire(state, self._clock())
            return state.window_tokens

    def total_in_flight(self) -> int:
        with self._lock:
            return sum(state.in_flight for state in self._tenants.values())

    def _release(self, lease: Lease, output_tokens: int) -> bool:
        with self._lock:
            if lease._released:
                return False
            lease._released = True
            state = self._tenants[lease.tenant]
            state.in_flight -= 1
            charge = lease._charge
            if charge is not None and not charge.expired:
                settled = lease.prompt_tokens + output_tokens
                state.window_tokens += settled - charge.tokens
                charge.tokens = settled
            self._expire(state, self._clock())
            self._forget_if_idle(lease.tenant, state)
            return True

    def _expire(self, state: _TenantState, now: float) -> None:
        while state.window and state.window[0].time <= now - self._window_s:
            charge = state.window.popleft()
            charge.expired = True
            state.window_tokens -= charge.tokens

    def _wait_s(self, state: _TenantState, allowed: int, now: float) -> float:
        """Seconds until the window holds at most `allowed` tokens, as far as known charges go."""
        remaining = state.window_tokens
        for charge in state.window:
            remaining -= charge.tokens
            if remaining <= allowed:
                return max(0.0, charge.time + self._window_s - now)
        return 0.0

    def _forget_if_idle(self, tenant: str, state: _TenantState) -> None:
        # Bounded memory: a tenant with nothing in flight and nothing in its window holds no state.
        if state.in_flight == 0 and not state.window:
            del self._tenants[tenant]


def _check_request(tenant: str, quota: Quota, prompt_tokens: int, max_new_tokens: int) -> int:
    for name, value in (("prompt_tokens", prompt_tokens), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgumentError(f"{name} must be a non-negative integer, not {value!r}")
    need = prompt_tokens + max_new_tokens
    for limit, asked, maximum, what in (
            ("max_prompt_tokens", prompt_tokens, quota.max_prompt_tokens, "the prompt has"),
            ("max_new_tokens", max_new_tokens, quota.max_new_tokens, "the request asks for up to"),
            ("tokens_per_minute", need, quota.tokens_per_minute, "prompt plus max new tokens is")):
        if maximum and asked > maximum:
            raise RequestTooLargeError(
                f"{what} {asked} tokens but tenant {tenant!r} allows at most {maximum} ({limit}): "
                f"send fewer tokens or ask an administrator to raise the limit", limit=limit, maximum=maximum)
    return need
