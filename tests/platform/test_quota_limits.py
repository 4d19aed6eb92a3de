"""Admission against tenant limits: what is refused, with which status, and that nothing leaks or
overshoots under concurrency."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from garrison.errors import grpc_status_for
from garrison.tenancy import Quota, QuotaEnforcer, QuotaExceededError, RequestTooLargeError
from garrison.tenancy.errors import InvalidArgumentError


class Ticker:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ticker() -> Ticker:
    return Ticker()


@pytest.fixture
def enforcer(ticker: Ticker) -> QuotaEnforcer:
    return QuotaEnforcer(clock=ticker)


def test_concurrency_limit_refuses_the_extra_request_until_one_finishes(enforcer: QuotaEnforcer) -> None:
    quota = Quota("acme", max_concurrent_requests=2)
    leases = [enforcer.admit("acme", quota, 10, 10) for _ in range(2)]
    with pytest.raises(QuotaExceededError) as err:
        enforcer.admit("acme", quota, 10, 10)
    assert err.value.limit == "max_concurrent_requests" and err.value.retry_after_s is None
    assert "max_concurrent_requests" in str(err.value)
    assert grpc_status_for(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert enforcer.admit("other", quota, 10, 10)  # tenants do not share limits
    leases[0].release(5)
    assert enforcer.in_flight("acme") == 1
    enforcer.admit("acme", quota, 10, 10)


def test_release_is_idempotent(enforcer: QuotaEnforcer) -> None:
    quota = Quota("acme", max_concurrent_requests=1, tokens_per_minute=100)
    lease = enforcer.admit("acme", quota, 10, 20)
    assert lease.release(3) is True  # completion
    assert lease.release(20) is False  # then the cancellation handler
    with lease:  # and a context manager exit: still nothing more
        pass
    assert lease.released and enforcer.in_flight("acme") == 0 and enforcer.tokens_in_window("acme") == 13
    with enforcer.admit("acme", quota, 10, 20):
        assert enforcer.in_flight("acme") == 1
    assert enforcer.in_flight("acme") == 0
    assert enforcer.tokens_in_window("acme") == 13 + 30  # an unsettled lease is charged in full
    with pytest.raises(ValueError):
        lease.release(-1)


def test_tokens_per_minute_reserves_at_admission_and_settles_at_release(enforcer: QuotaEnforcer,
                                                                        ticker: Ticker) -> None:
    quota = Quota("acme", tokens_per_minute=100)
    first = enforcer.admit("acme", quota, 30, 30)
    assert enforcer.tokens_in_window("acme") == 60
    ticker.now += 20
    with pytest.raises(QuotaExceededError) as err:
        enforcer.admit("acme", quota, 30, 30)  # 60 + 60 > 100 while the first may still use all it reserved
    assert err.value.limit == "tokens_per_minute" and err.value.retry_after_s == pytest.approx(40)
    assert err.value.resets_at is not None and "retry in 40.0 s" in str(err.value)
    first.release(10)  # it generated 10 of its 30: the window keeps 40
    second = enforcer.admit("acme", quota, 30, 30)
    assert enforcer.tokens_in_window("acme") == 100
    ticker.now += 40  # the first charge leaves the window 60 s after its admission
    assert enforcer.tokens_in_window("acme") == 60
    second.release(30)
    ticker.now += 20
    assert enforcer.tokens_in_window("acme") == 0 and enforcer.in_flight("acme") == 0


def test_a_request_no_retry_can_admit_is_an_invalid_argument(enforcer: QuotaEnforcer) -> None:
    quota = Quota("acme", max_prompt_tokens=100, max_new_tokens=50, tokens_per_minute=120)
    for prompt, new, limit in ((101, 1, "max_prompt_tokens"), (10, 51, "max_new_tokens"),
                               (100, 50, "tokens_per_minute")):
        with pytest.raises(RequestTooLargeError) as err:
            enforcer.admit("acme", quota, prompt, new)
        assert err.value.limit == limit and limit in str(err.value)
        assert grpc_status_for(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    for prompt, new in ((-1, 1), (1, -1), (1.5, 1), (True, 1)):
        with pytest.raises(InvalidArgumentError):
            enforcer.admit("acme", quota, prompt, new)
    assert enforcer.in_flight("acme") == 0 and enforcer.tokens_in_window("acme") == 0
    enforcer.admit("acme", quota, 100, 20).release(20)


def test_zero_means_no_limit_and_a_new_quota_applies_to_the_next_request(enforcer: QuotaEnforcer) -> None:
    leases = [enforcer.admit("acme", Quota("acme"), 10**6, 10**6) for _ in range(100)]
    assert enforcer.in_flight("acme") == 100 and enforcer.total_in_flight() == 100
    with pytest.raises(QuotaExceededError):
        enforcer.admit("acme", Quota("acme", max_concurrent_requests=100), 1, 1)
    for lease in leases:
        lease.release(0)
    assert enforcer.total_in_flight() == 0


def test_limits_hold_under_many_threads(ticker: Ticker) -> None:
    """16 threads admit and release at random; the concurrency and token limits are never passed
    and every counter is back to zero at the end."""
    enforcer = QuotaEnforcer(clock=ticker)  # a frozen clock: every charge stays in one window
    quota = Quota("acme", max_concurrent_requests=4, tokens_per_minute=50_000, max_new_tokens=64)
    lock = threading.Lock()
    held, peak, admitted, refused, violations = [0], [0], [0], {"max_concurrent_requests": 0,
                                                                 "tokens_per_minute": 0}, []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            try:
                lease = enforcer.admit("acme", quota, rng.randint(1, 64), rng.randint(1, 64))
            except QuotaExceededError as err:
                with lock:
                    refused[err.limit] += 1
                continue
            with lock:
                held[0] += 1
                peak[0] = max(peak[0], held[0])
                admitted[0] += 1
            if enforcer.tokens_in_window("acme") > quota.tokens_per_minute:
                violations.append("tokens_per_minute")
            if enforcer.in_flight("acme") > quota.max_concurrent_requests:
                violations.append("max_concurrent_requests")
            time.sleep(0.0002)  # hold the slot a moment so the threads contend for it
            with lock:
                held[0] -= 1
            # A cancellation racing the completion: both release, only one counts.
            output = rng.randint(0, lease.max_new_tokens)
            racer = threading.Thread(target=lease.release, args=(output,))
            racer.start()
            lease.release(output)
            racer.join()

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert violations == [] and peak[0] <= 4
    assert admitted[0] > 0 and refused["max_concurrent_requests"] > 0 and refused["tokens_per_minute"] > 0
    assert enforcer.in_flight("acme") == 0 and enforcer.total_in_flight() == 0
    assert enforcer.tokens_in_window("acme") <= quota.tokens_per_minute
    ticker.now += 60
    assert enforcer.tokens_in_window("acme") == 0
