"""The gateway's own cost: requests/s and time per streamed token through gRPC, against the same requests
sent straight to the router and to the engine, on a 1-token model, at 1, 64 and 256 concurrent streams.

    .venv/bin/python ops/bench/gateway.py [--quick] [--json]

Garrison issue 5. The model is a random Llama so small (hidden 16, one layer, vocabulary 64) that
computing a token costs next to nothing: what is measured is what surrounds it. Every request has a
4-token prompt and asks for exactly 1 new token (the requests/s workload) or 64 (the per-token
workload; the model has no end-of-sequence token, so every request streams all of them). N streams
each send their next request as soon as the previous one finished (a closed loop), through three
systems, one after the other:

- engine: `LLMEngine.step()` in a loop on this thread, N requests kept in it; no threads, no asyncio;
- router: `Router.stream` from N asyncio tasks, the engine in its engine core (in this process, polled from
  the loop): exactly what the gateway calls for each request;
- gateway: `garrison serve` (a `BackgroundServer` in this process: gRPC, the API key checked against
  the SQLite tenant store, quotas, the usage ledger, tracing), called over grpc.aio by a client in a
  process of its own, so that the client's Python does not take the server's interpreter lock.

Figures, per system and N: requests/s and the wall time per request (1/(requests/s)) of the 1-token
workload; output tokens/s and the wall time per token of the 64-token workload; this process's CPU
time per request and per token (the server's; the client's is apart), which other load on a shared
machine disturbs less than wall time. The gateway's overhead is its figures against the router's
measured in the same run: the ratio, and the time it adds per request and per token. The engine runs
max_num_seqs = 256, so no system ever queues a request: the figures are the gateway's, not a queue's.
A benchmark prints figures; it asserts nothing about time (DESIGN.md, rule 9). Progress goes to
stderr, so `--json` leaves stdout pure JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _common import (  # noqa: E402  (this folder is on sys.path: the benchmarks run as scripts)
    Machine, finite_or_none, fmt, fmt_load, machine_busy_s, machine_facts, own_cpu_s, progress)

MODEL = "one-token"
VOCAB = 64
MODEL_SHAPE = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
PROMPT_TOKENS = 4
SHAPES = (1, 64)  # new tokens per request: the requests/s workload, the per-token workload
MAX_NUM_SEQS = 256
SYSTEMS = ("engine", "router", "gateway")


@dataclass(slots=True, frozen=True)
class Workload:
    concurrencies: tuple[int, ...]
    warmup_s: float  # every stream running, not yet measured
    window_s: float  # measured
    seed: int = 0


FULL = Workload(concurrencies=(1, 64, 256), warmup_s=2.0, window_s=6.0)
QUICK = Workload(concurrencies=(1, 64, 256), warmup_s=1.0, window_s=2.0)


@dataclass(slots=True)
class Window:
    """What one measured window saw."""

    seconds: float = 0.0
    requests: int = 0  # finished in the window
    tokens: int = 0  # output tokens received in the window
    cpu_s: float = 0.0  # this process (the engine's, the router's or the server's side)
    client_cpu_s: float = 0.0  # the gateway's client process; 0 for the others
    machine_busy_s: float = 0.0  # every process on the machine
    in_flight: int = 0  # requests the server held when the window opened


@dataclass(slots=True)
class Result:
    system: str
    concurrency: int
    new_tokens: int
    window: Window

    @property
    def requests_per_s(self) -> float:
        return self.window.requests / self.window.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.window.tokens / self.window.seconds

    @property
    def others_cores(self) -> float:
        w = self.window
        return max(0.0, (w.machine_busy_s - w.cpu_s - w.client_cpu_s) / w.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "concurrency": self.concurrency, "new_tokens": self.new_tokens,
                **asdict(self.window), "requests_per_s": self.requests_per_s, "tokens_per_s": self.tokens_per_s,
                "others_cores": self.others_cores}


@dataclass(slots=True)
class Report:
    machine: Machine
    workload: Workload
    quick: bool
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0

    def result(self, system: str, concurrency: int, new_tokens: int) -> Result:
        return next(r for r in self.results
                    if (r.system, r.concurrency, r.new_tokens) == (system, concurrency, new_tokens))


class Meter:
    """Counts requests and tokens; snapshots them, with CPU clocks, when a window opens and closes."""

    def __init__(self) -> None:
        self.requests = self.tokens = 0
        self._opened: tuple[float, int, int, float, float] | None = None

    @property
    def is_open(self) -> bool:
        return self._opened is not None

    def open(self) -> None:
        self._opened = (time.perf_counter(), self.requests, self.tokens, own_cpu_s(), machine_busy_s())

    def close(self, in_flight: int = 0) -> Window:
        assert self._opened is not None
        start, requests, tokens, cpu, busy = self._opened
        return Window(time.perf_counter() - start, self.requests - requests, self.tokens - tokens,
                      own_cpu_s() - cpu, 0.0, machine_busy_s() - busy, in_flight)


def prompts(seed: int) -> Any:
    rng = random.Random(seed)
    while True:
        yield [rng.randrange(3, VOCAB) for _ in range(PROMPT_TOKENS)]


# -- the systems ------------------------------------------------------------------------------------


def run_engine(path: Path, workload: Workload) -> list[Result]:
    from garrison_workers.engine.llm_engine import LLMEngine
    from garrison_workers.engine.sequence import SamplingParams

    engine = LLMEngine.from_path(path, engine_settings())
    results = []
    for n, new_tokens in cells(workload):
        params, ids, source = SamplingParams(max_tokens=new_tokens), itertools.count(), prompts(workload.seed)
        meter, live, in_flight = Meter(), set(), 0

        def add() -> None:
            request_id = f"r{next(ids)}"
            engine.add_request(request_id, next(source), params)
            live.add(request_id)

        for _ in range(n):
            add()
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < workload.warmup_s + workload.window_s:
            if not meter.is_open and elapsed >= workload.warmup_s:
                meter.open()
                in_flight = engine.num_active_requests
            for out in engine.step():
                meter.tokens += len(out.new_token_ids)
                if out.finished:
                    meter.requests += 1
                    live.discard(out.request_id)
                    add()
        results.append(Result("engine", n, new_tokens, meter.close(in_flight)))
        for request_id in live:
            engine.abort_request(request_id)
        report_cell(results[-1])
    engine.shutdown()
    return results


def run_router(path: Path, workload: Workload) -> list[Result]:
    return asyncio.run(router_phase(path, workload))


async def router_phase(path: Path, workload: Workload) -> list[Result]:
    from garrison.router.discovery import Discovery
    from garrison.router.replica import LocalCore
    from garrison.router.router import Router
    from garrison.serving.config import ServeConfig
    from garrison.serving.controller import core_spec
    from garrison_workers.engine_core import EngineCore

    core = EngineCore(core_spec(deployment_config(path), 0, path, ServeConfig()))
    router = Router()
    discovery = Discovery(router, lambda: {core.name: LocalCore(core)}, "bench", {MODEL: 1})
    await discovery.start()
    try:
        return [await router_cell(router, core, n, new_tokens, workload) for n, new_tokens in cells(workload)]
    finally:  # the poller delivers outputs to this loop: stop it before the loop closes
        await discovery.stop()
        await asyncio.to_thread(core.shutdown)


async def router_cell(router: Any, core: Any, n: int, new_tokens: int, workload: Workload) -> Result:
    from garrison.router.router import RouteRequest
    from garrison_workers.engine.sequence import SamplingParams

    meter, params, ids = Meter(), SamplingParams(max_tokens=new_tokens), itertools.count()

    async def stream(seed: int) -> None:
        source = prompts(seed)
        while True:
            request = RouteRequest(f"r{next(ids)}", "bench", 1.0, MODEL, next(source), params, b"bench")
            async for out in router.stream(request):
                meter.tokens += len(out.new_token_ids)
            meter.requests += 1

    tasks = [asyncio.create_task(stream(workload.seed + i)) for i in range(n)]
    await asyncio.sleep(workload.warmup_s)
    meter.open()
    in_flight = router.load(MODEL).in_flight
    await asyncio.sleep(workload.window_s)
    result = Result("router", n, new_tokens, meter.close(in_flight))
    await stop(tasks)
    # The core takes the aborts between steps: the next cell starts on an empty engine.
    while core.engine.num_active_requests:
        await asyncio.sleep(0.01)
    report_cell(result)
    return result


def unlimited_tenant_key(address: str, admin_key: Path) -> str:
    """A tenant without limits (the embedded default's own tenant has some): what is measured is the gateway."""
    from garrison.client import GarrisonClient

    with GarrisonClient(address, key_file=admin_key) as client:
        client.admin.create_tenant(name="bench", models=[MODEL])
        return client.admin.create_api_key(tenant="bench").secret


def run_gateway(path: Path, workload: Workload) -> list[Result]:
    from garrison.serving.background import BackgroundServer
    from garrison.serving.config import ServeConfig

    results = []
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as data_dir:
        config = ServeConfig(data_dir=Path(data_dir), listen="127.0.0.1:0", models=(deployment_config(path),))
        with BackgroundServer(config) as server:
            key = unlimited_tenant_key(server.address, Path(data_dir) / "admin.key")
            ours, theirs = spawn.Pipe()
            client = Client(spawn.Process(target=client_process, args=(server.address, key, theirs), daemon=True), ours)
            client.process.start()
            try:
                for n, new_tokens in cells(workload):
                    results.append(gateway_cell(server, client, n, new_tokens, workload))
            finally:
                ours.send(None)
                client.process.join(30)
    return results


@dataclass(slots=True)
class Client:
    """The gateway's client process and our end of its pipe."""

    process: Any
    conn: Connection

    def receive(self, timeout_s: float = 300.0) -> Any:
        """The client's next message; an error, not a hang, if it died."""
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.5):
            if not self.process.is_alive():
                raise RuntimeError(f"the client process died (exit code {self.process.exitcode}); traceback above")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the client process sent nothing for {timeout_s:g} s")
        return self.conn.recv()


def gateway_cell(server: Any, client: Client, n: int, new_tokens: int, workload: Workload) -> Result:
    meter = Meter()
    client.conn.send((n, new_tokens, workload.warmup_s, workload.window_s, workload.seed))
    assert client.receive() == "open"
    meter.open()
    in_flight = server.server.router.load(MODEL).in_flight
    requests, tokens, client_cpu_s = client.receive()
    window = meter.close(in_flight)
    window.requests, window.tokens, window.client_cpu_s = requests, tokens, client_cpu_s
    assert client.receive() == "stopped"
    while server.server.router.load(MODEL).in_flight:  # the streams' cancellations reach the server
        time.sleep(0.05)
    result = Result("gateway", n, new_tokens, window)
    report_cell(result)
    return result


def client_process(address: str, key: str, conn: Connection) -> None:
    """The gateway's load: N grpc.aio streams in one event loop, run cell by cell as the parent asks."""
    asyncio.run(client_main(address, key, conn))


async def client_main(address: str, key: str, conn: Connection) -> None:
    import grpc

    from garrison.v1 import inference_pb2 as pb, inference_pb2_grpc

    loop = asyncio.get_running_loop()
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while (cell := await loop.run_in_executor(None, conn.recv)) is not None:
            n, new_tokens, warmup_s, window_s, seed = cell
            meter = Meter()

            async def stream(seed: int) -> None:
                source = prompts(seed)
                while True:
                    request = pb.GenerateRequest(model=MODEL, token_ids=next(source), max_tokens=new_tokens)
                    async for response in stub.Generate(request, metadata=metadata):
                        meter.tokens += len(response.token_ids)
                    meter.requests += 1

            tasks = [asyncio.create_task(stream(seed + i)) for i in range(n)]
            await asyncio.sleep(warmup_s)
            conn.send("open")
            meter.open()
            await asyncio.sleep(window_s)
            window = meter.close()
            conn.send((window.requests, window.tokens, window.cpu_s))
            await stop(tasks)
            conn.send("stopped")


async def stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if not isinstance(outcome, asyncio.CancelledError):
            raise RuntimeError(f"a stream failed: {outcome!r}")


# -- the run ----------------------------------------------------------------------------------------


def engine_settings() -> Any:
    from garrison_workers.engine.config import EngineConfig

    return EngineConfig(kv_cache_bytes=32 << 20, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=2048)


def deployment_config(path: Path) -> Any:
    from garrison.serving.config import ModelDeploymentConfig

    return ModelDeploymentConfig(MODEL, str(path), on_ray=False, engine=engine_settings())


def cells(workload: Workload) -> list[tuple[int, int]]:
    return [(n, new_tokens) for n in workload.concurrencies for new_tokens in SHAPES]


def report_cell(r: Result) -> None:
    progress(f"  {r.system:<8} N={r.concurrency:<4} {r.new_tokens:>2} new tokens: {r.requests_per_s:8.1f} req/s "
             f"{r.tokens_per_s:9.1f} tok/s   in flight {r.window.in_flight:<4} others {r.others_cores:.2f} cores")


def save_model(directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL_SHAPE, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=None)  # no end of sequence: every request streams all it asks for
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


def run_benchmark(quick: bool) -> Report:
    import torch

    # The model's arithmetic is next to nothing; a second OpenMP thread only waits for the first
    # whenever another process takes a core (every op then stalls), and the gateway needs that core.
    torch.set_num_threads(1)
    started = time.perf_counter()
    workload = QUICK if quick else FULL
    report = Report(machine_facts(), workload, quick)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(Path(tmp) / "model")
        for system, run in (("engine", run_engine), ("router", run_router), ("gateway", run_gateway)):
            progress(system)
            report.results += run(path, workload)
    report.machine.load_average_end = os.getloadavg()
    report.wall_s = time.perf_counter() - started
    return report


# -- output -----------------------------------------------------------------------------------------


def render(report: Report) -> str:
    return "\n".join([*header_lines(report), "", *results_lines(report), "", *overhead_lines(report)])


def header_lines(report: Report) -> list[str]:
    m, w = report.machine, report.workload
    mode = "QUICK (smoke test: shorter windows)" if report.quick else "full"
    return [
        "Garrison gateway overhead: a 1-token model (random Llama, hidden 16, 1 layer, vocabulary 64), fp32, CPU",
        f"machine    {m.cpu}; os.cpu_count {m.os_cpu_count}; torch threads {m.torch_threads}; RAM {m.ram_gib:.1f} GiB",
        f"software   torch {m.torch_version}; transformers {m.transformers_version}; python {m.python_version}",
        f"date       {m.date}; load average start {fmt_load(m.load_average_start)}, end {fmt_load(m.load_average_end)}",
        f"mode       {mode}; run wall time {report.wall_s:.0f} s",
        f"workload   N = {', '.join(map(str, w.concurrencies))} streams, each sending its next request when the last"
        f" ends; prompts {PROMPT_TOKENS} random token ids;",
        f"           {SHAPES[0]} new token (requests/s) or {SHAPES[1]} (per token) each; {w.warmup_s:g} s warm-up, then"
        f" {w.window_s:g} s measured per cell",
        "systems    engine: LLMEngine.step() loop, N requests kept in it; router: Router.stream from N asyncio tasks,",
        "           engine on its replica thread; gateway: garrison serve (gRPC, API key against SQLite, quotas, usage",
        "           ledger, tracing) over grpc.aio from a client process",
        f"engine     max_num_seqs {MAX_NUM_SEQS} (no request ever queues), block 16, max_num_batched_tokens 2048,"
        " one torch thread",
        "columns    ms/req = 1000 / (req/s); us/tok = 1e6 / (tok/s); CPU = this process, the server side; client =",
        "           cores the gateway's client process used; in flight = requests the server held as the window",
        "           opened; others = cores other processes used meanwhile (well above 0: the row was disturbed)",
    ]


def results_lines(report: Report) -> list[str]:
    lines = [f"{'N':>4}  {'system':<8}{'req/s':>9}{'ms/req':>8}{'CPU ms/req':>11}{'tok/s':>9}{'us/tok':>8}"
             f"{'CPU us/tok':>11}{'client':>8}{'in flight':>10}{'others':>8}"]
    for n in report.workload.concurrencies:
        if len(lines) > 1:
            lines.append("")
        for system in SYSTEMS:
            one, many = report.result(system, n, SHAPES[0]), report.result(system, n, SHAPES[1])
            client = max(one.window.client_cpu_s / one.window.seconds, many.window.client_cpu_s / many.window.seconds)
            lines.append(
                f"{n:>4}  {system:<8}{fmt(one.requests_per_s, 9)}{fmt(per(one.requests_per_s, 1e3), 8, 2)}"
                f"{fmt(1e3 * one.window.cpu_s / max(one.window.requests, 1), 11, 2)}{fmt(many.tokens_per_s, 9)}"
                f"{fmt(per(many.tokens_per_s, 1e6), 8)}{fmt(1e6 * many.window.cpu_s / max(many.window.tokens, 1), 11)}"
                f"{client:>8.2f}{many.window.in_flight:>10}{max(one.others_cores, many.others_cores):>8.2f}")
    return lines


def per(rate: float, unit: float) -> float:
    return unit / rate if rate > 0 else float("nan")


def overhead(report: Report, n: int) -> dict[str, float]:
    """The gateway against the router at concurrency n: ratios, and the time it adds."""
    gw_one, rt_one = report.result("gateway", n, SHAPES[0]), report.result("router", n, SHAPES[0])
    gw_many, rt_many = report.result("gateway", n, SHAPES[1]), report.result("router", n, SHAPES[1])
    return {
        "requests_per_s_ratio": gw_one.requests_per_s / rt_one.requests_per_s,
        "added_ms_per_request": per(gw_one.requests_per_s, 1e3) - per(rt_one.requests_per_s, 1e3),
        "tokens_per_s_ratio": gw_many.tokens_per_s / rt_many.tokens_per_s,
        "added_us_per_token": per(gw_many.tokens_per_s, 1e6) - per(rt_many.tokens_per_s, 1e6),
        "added_cpu_ms_per_request": 1e3 * (gw_one.window.cpu_s / max(gw_one.window.requests, 1)
                                           - rt_one.window.cpu_s / max(rt_one.window.requests, 1)),
        "added_cpu_us_per_token": 1e6 * (gw_many.window.cpu_s / max(gw_many.window.tokens, 1)
                                         - rt_many.window.cpu_s / max(rt_many.window.tokens, 1)),
    }


def overhead_lines(report: Report) -> list[str]:
    lines = ["the gateway's own cost: gateway against router, same run (ratio below 1: the gateway is slower)",
             f"{'N':>4}  {'req/s ratio':>12}{'+ms/req':>9}{'+CPU ms/req':>13}{'tok/s ratio':>13}{'+us/tok':>9}"
             f"{'+CPU us/tok':>13}"]
    for n in report.workload.concurrencies:
        o = overhead(report, n)
        lines.append(f"{n:>4}  {fmt(o['requests_per_s_ratio'], 12, 2, 'x')}{fmt(o['added_ms_per_request'], 9, 2)}"
                     f"{fmt(o['added_cpu_ms_per_request'], 13, 2)}{fmt(o['tokens_per_s_ratio'], 13, 2, 'x')}"
                     f"{fmt(o['added_us_per_token'], 9)}{fmt(o['added_cpu_us_per_token'], 13)}")
    return lines


def to_json(report: Report) -> str:
    body = {
        "machine": asdict(report.machine), "workload": asdict(report.workload), "quick": report.quick,
        "wall_s": report.wall_s, "model": MODEL_SHAPE, "max_num_seqs": MAX_NUM_SEQS,
        "results": [r.to_dict() for r in report.results],
        "gateway_overhead": {str(n): overhead(report, n) for n in report.workload.concurrencies},
    }
    return json.dumps(finite_or_none(body), indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows: a smoke test of the script")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args()
    report = run_benchmark(args.quick)
    print(to_json(report) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
