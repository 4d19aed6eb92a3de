"""Integer flags whose values travel in protobuf fields: bounded as those fields are, so a value out of range is a
usage error that says the range (exit status 2), not a traceback from protobuf's setter."""

from __future__ import annotations

import argparse
from collections.abc import Callable

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1


def integer(low: int, high: int) -> Callable[[str], int]:
    """An argparse `type` taking integers from `low` to `high`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: give an integer from {low} to {high}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse
