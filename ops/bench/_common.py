"""What every benchmark under ops/bench/ shares: machine facts, CPU accounting, number formatting, JSON.

The benchmarks run as scripts (`.venv/bin/python ops/bench/NAME.py`), so this folder is on `sys.path`
and they import this module as `_common`.
"""

from __future__ import annotations

import datetime
import math
import os
import resource
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

GiB = 1 << 30


# -- the machine ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Machine:
    cpu: str
    os_cpu_count: int | None
    torch_threads: int
    ram_gib: float
    torch_version: str
    transformers_version: str
    python_version: str
    date: str
    load_average_start: tuple[float, float, float]
    load_average_end: tuple[float, float, float] = (0.0, 0.0, 0.0)


def machine_facts() -> Machine:
    import transformers

    return Machine(
        cpu=cpuinfo_field("model name"), os_cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        ram_gib=proc_kib("/proc/meminfo", "MemTotal") * 1024 / GiB, torch_version=torch.__version__,
        transformers_version=transformers.__version__, python_version=sys.version.split()[0],
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        load_average_start=os.getloadavg())


def cpuinfo_field(name: str) -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return "unknown"


def proc_kib(file: str, name: str) -> int:
    for line in Path(file).read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


# -- CPU accounting ---------------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used (and the hypervisor has stolen) since boot."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- output -----------------------------------------------------------------------------------------


def engine_config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config's fields, every value JSON-ready (anything else, e.g. a torch dtype, as str)."""
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    return {name: v if isinstance(v, (bool, int, float, str, type(None))) else str(v) for name, v in values.items()}


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def fmt(value: float, width: int, precision: int = 1, suffix: str = "") -> str:
    """Right-aligned in `width`; a figure that could not be measured prints as '-'."""
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width - len(suffix)}.{precision}f}{suffix}"


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a figure that could not be measured (decode time <= 0) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def save_random_llama4(directory: Path, seed: int, **overrides: Any) -> dict[str, Any]:
    """A random tiny Llama 4 saved with transformers (as tests/conftest.py's save_tiny_llama4); its config dict."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    from transformers.utils import logging as hf_logging

    from garrison_workers.config import tiny_llama4

    hf_logging.disable_progress_bar()
    raw = tiny_llama4(**overrides)
    torch.manual_seed(seed)
    config = Llama4TextConfig(**{k: v for k, v in raw.items() if k != "model_type"}, initializer_range=0.15)
    Llama4ForCausalLM(config).eval().save_pretrained(directory)
    return raw
