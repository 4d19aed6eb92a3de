"""Fault injection: named points in a rank's code where a test or a chaos drill makes it fail the way hardware and
networks do (a process that dies, a peer that is late), through hooks the code offers rather than by patching
its internals. Nothing is armed unless a caller arms it (`WorkerGroup.inject_fault`); an unarmed point costs a
dictionary lookup.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

# Where a rank checks for a fault: the start of a step, of a KV export or import, and of a KV send on a
# channel's thread.
POINTS = ("execute", "export_kv", "import_kv", "send")


@dataclass(slots=True, frozen=True)
class Fault:
    kind: Literal["exit", "delay"]  # "exit": the process dies at once; "delay": it waits `seconds` first
    seconds: float = 0.0


class FaultPoints:
    def __init__(self) -> None:
        self._armed: dict[str, Fault] = {}

    def arm(self, point: str, fault: Fault | None) -> None:
        """Arm `point` with `fault`, or disarm it (None)."""
        if point not in POINTS:
            raise ValueError(f"no fault point {point!r}; the points are {', '.join(POINTS)}")
        if fault is None:
            self._armed.pop(point, None)
        else:
            self._armed[point] = fault

    def hit(self, point: str) -> None:
        fault = self._armed.get(point)
        if fault is None:
            return
        if fault.kind == "exit":
            os._exit(1)
        time.sleep(fault.seconds)
