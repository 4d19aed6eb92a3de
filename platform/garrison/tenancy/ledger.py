"""Usage batches and the spool that keeps the ones the database has not taken.

A gateway writes usage in batches: every count added since the last batch, one row per (tenant, model,
UTC hour), under a random batch id. `TenancyService.record_usage_batch` writes a batch in one
transaction together with its id, and skips a batch whose id is already recorded, so a batch may be
retried, or replayed from the spool, any number of times and is counted once.

The spool is a file of the data directory (mode 0600, one JSON batch per line) holding batches the
database did not confirm: written when a write fails (and at shutdown for whatever is left), read back
at the next start. A torn last line (the process died while appending) is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from garrison.tenancy.errors import InvalidArgumentError

log = logging.getLogger(__name__)

SPOOL_FILE = "usage-spool.jsonl"
COUNTS = ("requests", "prompt_tokens", "output_tokens", "rejected_requests")
# Batch ids are kept this long: a spooled batch must be replayed within it to be recognised.
BATCH_RETENTION_DAYS = 90


@dataclass(frozen=True, slots=True)
class UsageCount:
    tenant: str
    model: str
    hour: datetime  # aware, UTC, on the hour
    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    rejected_requests: int = 0

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTS}


@dataclass(frozen=True, slots=True)
class UsageBatch:
    id: str
    rows: tuple[UsageCount, ...]

    @classmethod
    def new(cls, rows: Iterable[UsageCount]) -> UsageBatch:
        return cls(str(uuid.uuid4()), tuple(rows))

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "rows": [[r.tenant, r.model, r.hour.isoformat(), *r.counts().values()]
                                                   for r in self.rows]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> UsageBatch:
        try:
            raw = json.loads(line)
            rows = tuple(UsageCount(str(t), str(m), datetime.fromisoformat(h), *map(_count, counts))
                         for t, m, h, *counts in raw["rows"])
            return cls(str(raw["id"]), rows)
        except (ValueError, KeyError, TypeError) as err:
            raise InvalidArgumentError(f"not a usage batch ({err})") from None


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"count {value!r}")
    return value


class Spool:
    """Append-only file of unconfirmed batches; cleared once every batch in it is confirmed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, batches: Iterable[UsageBatch]) -> None:
        lines = "".join(batch.to_json() + "\n" for batch in batches)
        if not lines:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, lines.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[UsageBatch]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        batches = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                batches.append(UsageBatch.from_json(line))
            except InvalidArgumentError as err:
                log.warning("usage spool %s line %d skipped: %s", self.path, number, err)
        return batches

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
