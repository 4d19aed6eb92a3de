"""Where Garrison keeps its state on this machine when no flag says otherwise, and how that place is guarded.

The data directory holds the tenant database, key files, the usage spool and (by default) the weight
store. It is created 0700, and refused when group or others may write to it: whoever can write there
can swap a key file or the database. (On Kubernetes, where a volume with an fsGroup is group-writable,
point `data_dir` at a folder inside the volume: Garrison creates that one 0700.)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from garrison_workers.errors import GarrisonError


class DataDirError(GarrisonError):
    """The data directory is unsafe or unusable."""


def default_data_dir() -> Path:
    """$GARRISON_DATA_DIR, else $XDG_DATA_HOME/garrison, else ~/.local/share/garrison."""
    if os.environ.get("GARRISON_DATA_DIR"):
        return Path(os.environ["GARRISON_DATA_DIR"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "garrison"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` with mode 0700 (parents as needed), or check an existing one; DataDirError if unsafe."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise DataDirError(f"cannot create the data directory {path}: {err.strerror}") from None
    problem = private_dir_problem(path)
    if problem:
        raise DataDirError(problem)
    return path


def private_dir_problem(path: Path) -> str | None:
    """Why `path` (existing) is not a safe data directory, or None."""
    try:
        info = path.stat()
    except OSError as err:
        return f"cannot use the data directory {path}: {err.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return f"the data directory {path} is not a directory"
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"the data directory {path} is writable by {'others' if mode & stat.S_IWOTH else 'its group'} "
                f"(mode {mode:04o}), who could replace its keys or database: run `chmod 700 {path}`, or choose "
                f"another data_dir")
    return None
