"""What every benchmark shares: the stamp (it lives in the package so that `lightning-distill evaluate` uses it too)
and the one way a benchmark writes its results, which never drops an earlier result without saying so."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from lightning_distill.io import atomic_path
from lightning_distill.provenance import commit, hardware, stamp

__all__ = ["REPLACED_DIR", "commit", "hardware", "keep_previous", "stamp", "write_result"]

#: Where a result that a new run replaces is kept, beside the results (the suite's report reads only the top folder).
REPLACED_DIR = "replaced"


def keep_previous(path: Path) -> Path | None:
    """Move an existing ``path`` to ``<its folder>/replaced/<stem>.<UTC time><suffix>`` and say so; ``None`` if none.

    A re-run of a benchmark (by hand, or ``suite.py --force``) thus replaces the result that the report shows
    while the earlier figures stay on disk, dated, for comparison.
    """
    path = Path(path)
    if not path.exists():
        return None
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    kept = path.parent / REPLACED_DIR / f"{path.stem}.{when}{path.suffix}"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, kept)
    print(f"replacing {path}; the previous file is kept as {kept}", flush=True)
    return kept


def write_result(path: Path, text: str) -> Path:
    """Write one result file atomically; an existing one is first kept by :func:`keep_previous`."""
    path = Path(path)
    keep_previous(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
