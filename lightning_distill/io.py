"""Atomic file writes: a temporary file beside the destination, then one rename; and the cleanup of orphans of them."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

#: How :func:`atomic_path` names its temporary file: ``.<dest name>.<writer pid>.<random>.tmp`` beside ``dest``.
#: The pid tells an orphan (its writer was killed mid-write) from a file another live process is still writing.
_TEMP_NAME = re.compile(r"^\.(?P<dest>.+)\.(?P<pid>\d+)\.(?P<rand>[a-z0-9_]+)\.tmp$")
#: The naming before the pid was added (``.<dest name>.<random>.tmp``, also that of a plain ``mkstemp`` by other code).
_LEGACY_TEMP_NAME = re.compile(r"^\.(?P<dest>.+)\.(?P<rand>[a-z0-9_]{8})\.tmp$")
#: A temporary file that names no writer counts as an orphan only once it is this old (seconds): a writer that is
#: still running may have made it.
LEGACY_ORPHAN_AGE_S = 3600.0


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it replaces ``dest`` in one step.

    A crash or an exception mid-write leaves the previous file intact, never a truncated one; concurrent writers
    (DDP ranks, parallel runs) each write their own temporary file. A process killed mid-write (SIGKILL, OOM) leaves its
    temporary file behind: :func:`remove_orphaned_temporaries` finds and removes such files.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results and caches are meant to be shared
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def temporary_destination(path: str | os.PathLike) -> tuple[str, int | None] | None:
    """``(destination name, writer pid)`` when ``path`` is named like an :func:`atomic_path` temporary file, else None.

    The pid is ``None`` for files of the older naming, which recorded no writer.
    """
    name = Path(path).name
    m = _TEMP_NAME.match(name)
    if m:
        return m["dest"], int(m["pid"])
    m = _LEGACY_TEMP_NAME.match(name)
    return (m["dest"], None) if m else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


def orphaned_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """The :func:`atomic_path` temporary files in ``folder`` whose writer no longer runs on this machine.

    A file that names its writer's pid is an orphan once that process is gone; one that names none (the older
    naming) once it is :data:`LEGACY_ORPHAN_AGE_S` old.

    Args:
        folder: where to look (not recursive).
        names: only orphans of these destination names (``["distilled.pt"]``); ``None``: of any destination.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if names is None else set(names)
    out = []
    for p in sorted(folder.iterdir()):
        found = temporary_destination(p)
        if found is None or not p.is_file() or (wanted is not None and found[0] not in wanted):
            continue
        pid = found[1]
        orphan = not _alive(pid) if pid is not None else time.time() - p.stat().st_mtime > LEGACY_ORPHAN_AGE_S
        if orphan:
            out.append(p)
    return out


def remove_orphaned_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Remove what :func:`orphaned_temporaries` finds (files a killed writer left); returns the removed paths."""
    removed = []
    for p in orphaned_temporaries(folder, names):
        with contextlib.suppress(FileNotFoundError):  # another cleaner got there first
            p.unlink()
            removed.append(p)
    return removed
