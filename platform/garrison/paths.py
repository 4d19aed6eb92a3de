"""Where Garrison keeps its state on this machine when no flag says otherwise."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """$GARRISON_DATA_DIR, else $XDG_DATA_HOME/garrison, else ~/.local/share/garrison."""
    if os.environ.get("GARRISON_DATA_DIR"):
        return Path(os.environ["GARRISON_DATA_DIR"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "garrison"
