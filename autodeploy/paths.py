"""Where autodeploy keeps what it downloads or converts once and reuses."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$AUTODEPLOY_CACHE`, else `$XDG_CACHE_HOME/autodeploy`, else `~/.cache/autodeploy`."""
    if os.environ.get("AUTODEPLOY_CACHE"):
        return Path(os.environ["AUTODEPLOY_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "autodeploy"
