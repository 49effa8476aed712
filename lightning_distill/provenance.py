"""What every benchmark result is stamped with: date, hardware, library versions, commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]  # the checkout, when installed editable


def hardware() -> str:
    """CPU model and cores, or the GPU name."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"


#: Names the commit where the code runs from a copy of the tree without git (a GPU machine the tree was sent to).
COMMIT_ENV = "LIGHTNING_DISTILL_COMMIT"


def commit() -> str:
    """The checked-out commit, with ``-dirty`` when the tree has uncommitted changes (``unknown`` outside a git
    checkout); ``$LIGHTNING_DISTILL_COMMIT`` with ``(copy)`` where whoever copied the tree elsewhere named it."""
    named = os.environ.get(COMMIT_ENV, "").strip()
    if named:  # the copy may carry a stale .git of its own: the name given wins
        return f"{named} (copy)"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout
    except OSError:
        return "unknown"
    return sha.strip() + ("-dirty" if dirty.strip() else "") if sha.strip() else "unknown"


def stamp() -> dict[str, Any]:
    import lightning

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "commit": commit(),
    }
