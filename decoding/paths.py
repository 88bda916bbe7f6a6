"""Where leapserve keeps what it builds: converted checkpoints, compiled graphs, C++ extensions."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LEAPSERVE_CACHE, else ~/.cache/leapserve."""
    return Path(os.environ.get("LEAPSERVE_CACHE", Path.home() / ".cache" / "leapserve"))


def point_inductor_at_cache() -> None:
    """Compiled graphs under cache_dir()/inductor unless $TORCHINDUCTOR_CACHE_DIR is set. Inductor fixes its directory
    the first time anything asks for it (importing some of torch's modules does), so this runs before those imports."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
