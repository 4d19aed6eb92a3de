"""What the deployment must serve: arrivals (a rate, a concurrency, or a JSONL trace), prompt and output length
distributions, and the SLOs a layout must meet."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from garrison_workers.errors import InvalidRequestError


@dataclass(slots=True, frozen=True)
class LengthDist:
    """Token counts: `fixed:N` (or just N), `uniform:LOW:HIGH`, `lognormal:MEDIAN:SIGMA` (clipped to 1..max)."""

    kind: str
    a: float
    b: float = 0.0
    maximum: int = 10_000_000

    def __post_init__(self) -> None:
        ok = {"fixed": self.a >= 1, "uniform": 1 <= self.a <= self.b, "lognormal": self.a >= 1 and self.b >= 0}
        if not ok.get(self.kind, False):
            raise InvalidRequestError(f"invalid length distribution {self.kind}:{self.a:g}:{self.b:g}; use N, "
                                      "fixed:N, uniform:LOW:HIGH (1 <= LOW <= HIGH) or lognormal:MEDIAN:SIGMA")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        parts = text.split(":")
        try:
            numbers = [float(p) for p in parts[1:]] if not parts[0].replace(".", "").isdigit() else [float(parts[0])]
        except ValueError:
            raise InvalidRequestError(f"invalid length distribution {text!r}: numbers expected after the kind"
                                      ) from None
        kind = "fixed" if parts[0].replace(".", "").isdigit() else parts[0]
        if not numbers or len(numbers) > 2:
            raise InvalidRequestError(f"invalid length distribution {text!r}; use N, uniform:LOW:HIGH or "
                                      "lognormal:MEDIAN:SIGMA")
        return cls(kind, *numbers)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "uniform":
            value = rng.uniform(self.a, self.b)
        else:
            value = self.a * math.exp(rng.gauss(0.0, self.b))
        return max(1, min(self.maximum, round(value)))

    @property
    def high(self) -> int:
        """A length this distribution rarely exceeds (its 99.9th percentile for lognormal)."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return int(self.b)
        return min(self.maximum, round(self.a * math.exp(3.09 * self.b)))

    def describe(self) -> str:
        return {"fixed": f"{self.a:g}", "uniform": f"uniform {self.a:g}-{self.b:g}",
                "lognormal": f"lognormal median {self.a:g} σ {self.b:g}"}[self.kind]


@dataclass(slots=True, frozen=True)
class Request:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    tenant: str = ""


class Arrivals(Protocol):
    """Where requests come from, as the simulation runs: some known up front, some in reply to events."""

    def initial(self) -> list[Request]: ...

    def on_first_token(self, request: Request, now: float) -> list[Request]: ...

    def on_finish(self, request: Request, now: float) -> list[Request]: ...

    def done(self) -> bool:
        """True once the workload is over (requests still running are then not waited for)."""
        ...


@dataclass(slots=True)
class OpenLoop:
    """Requests at fixed times (a Poisson process or a trace)."""

    requests: list[Request]

    def initial(self) -> list[Request]:
        return list(self.requests)

    def on_first_token(self, request: Request, now: float) -> list[Request]:
        return []

    def on_finish(self, request: Request, now: float) -> list[Request]:
        return []

    def done(self) -> bool:
        return False


class ClosedLoop:
    """`concurrency` users, each sending its next request when the last one finishes."""

    def __init__(self, workload: Workload, concurrency: int) -> None:
        self.workload, self.concurrency = workload, concurrency
        self.rng, self.issued = random.Random(workload.seed), 0

    def _next(self, now: float) -> list[Request]:
        if self.issued >= self.workload.num_requests:
            return []
        self.issued += 1
        w = self.workload
        return [Request(f"req-{self.issued}", now, w.prompt.sample(self.rng), w.output.sample(self.rng))]

    def initial(self) -> list[Request]:
        return [r for _ in range(self.concurrency) for r in self._next(0.0)]

    def on_first_token(self, request: Request, now: float) -> list[Request]:
        return []

    def on_finish(self, request: Request, now: float) -> list[Request]:
        return self._next(now)

    def done(self) -> bool:
        return False


@dataclass(slots=True, frozen=True)
class Workload:
    prompt: LengthDist
    output: LengthDist
    rate: float | None = None  # requests/s across the deployment (Poisson arrivals)
    concurrency: int | None = None  # users across the deployment, each waiting for its answer (closed loop)
    trace: tuple[Request, ...] = ()
    num_requests: int = 400
    seed: int = 0

    def __post_init__(self) -> None:
        given = [self.rate is not None, self.concurrency is not None, bool(self.trace)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of an arrival rate, a concurrency or a trace")
        if (self.rate is not None and self.rate <= 0) or (self.concurrency is not None and self.concurrency < 1):
            raise InvalidRequestError("the arrival rate must be > 0 and the concurrency >= 1")
        if self.num_requests < 1:
            raise InvalidRequestError("num_requests must be >= 1")

    @property
    def longest_prompt(self) -> int:
        return max((r.prompt_tokens for r in self.trace), default=0) or self.prompt.high

    def arrivals(self, replicas: int) -> Arrivals:
        """One replica's share: a Poisson stream at rate / replicas, concurrency / replicas users, or every
        replicas-th request of the trace (the router spreads the load evenly)."""
        if self.trace:
            return OpenLoop(list(self.trace[::replicas]))
        if self.concurrency is not None:
            return ClosedLoop(self, max(1, round(self.concurrency / replicas)))
        assert self.rate is not None
        rng, now, requests = random.Random(self.seed), 0.0, []
        for i in range(max(1, self.num_requests // replicas)):
            now += rng.expovariate(self.rate / replicas)
            requests.append(Request(f"req-{i}", now, self.prompt.sample(rng), self.output.sample(rng)))
        return OpenLoop(requests)

    def describe(self) -> str:
        if self.trace:
            return f"trace of {len(self.trace)} requests"
        load = f"{self.rate:g} req/s" if self.rate is not None else f"{self.concurrency} concurrent users"
        return f"{load}; prompt {self.prompt.describe()}, output {self.output.describe()} tokens"


def load_trace(path: Path) -> tuple[Request, ...]:
    """JSONL: one object per line with `arrival_s` (or `timestamp`), `prompt_tokens`, `output_tokens`, `tenant`."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise InvalidRequestError(f"cannot read the trace {path}: {err.strerror}") from None
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        requests.append(_trace_request(path, number, line))
    if not requests:
        raise InvalidRequestError(f"the trace {path} is empty: it needs one JSON object per line with arrival_s, "
                                  "prompt_tokens and output_tokens")
    start = min(r.arrival_s for r in requests)
    return tuple(sorted((Request(r.request_id, r.arrival_s - start, r.prompt_tokens, r.output_tokens, r.tenant)
                         for r in requests), key=lambda r: r.arrival_s))


def _trace_request(path: Path, number: int, line: str) -> Request:
    where = f"{path}:{number}"
    try:
        raw = json.loads(line)
        arrival = float(raw.get("arrival_s", raw.get("timestamp")))
        prompt, output = int(raw["prompt_tokens"]), int(raw["output_tokens"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise InvalidRequestError(f"{where}: not a trace record ({err}); each line needs arrival_s, prompt_tokens "
                                  "and output_tokens") from None
    if prompt < 1 or output < 1 or not math.isfinite(arrival):
        raise InvalidRequestError(f"{where}: prompt_tokens and output_tokens must be >= 1 and arrival_s finite")
    return Request(f"trace-{number}", arrival, prompt, output, str(raw.get("tenant", "")))


@dataclass(slots=True, frozen=True)
class SLO:
    """Targets at a percentile: time to first token, and time per output token (each request's mean gap)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    percentile: float = 99.0

    def __post_init__(self) -> None:
        if not 0 < self.percentile <= 100:
            raise InvalidRequestError(f"the SLO percentile must be in (0, 100], got {self.percentile}")
        if any(v is not None and v <= 0 for v in (self.ttft_s, self.tpot_s)):
            raise InvalidRequestError("SLO targets must be > 0 seconds")

    def describe(self) -> str:
        parts = [f"TTFT p{self.percentile:g} <= {self.ttft_s:g} s" if self.ttft_s else "",
                 f"TPOT p{self.percentile:g} <= {self.tpot_s * 1e3:g} ms" if self.tpot_s else ""]
        return ", ".join(p for p in parts if p) or "none"
