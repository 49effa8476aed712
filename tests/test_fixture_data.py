"""The shipped real-data fixture (tests/fixtures/datasets): unchanged, and an exact excerpt of the full data."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _listed_md5s() -> dict[str, str]:
    """The file table of tests/fixtures/README.md: relative path -> md5."""
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \| ([0-9a-f]{32}) \|$", (FIXTURES / "README.md").read_text(), re.M)
    return {path: md5 for path, _, md5 in rows}


def test_fixture_files_match_the_readme(fixture_root: Path) -> None:
    listed = _listed_md5s()
    on_disk = sorted(str(p.relative_to(fixture_root)) for p in fixture_root.rglob("*") if p.is_file())
    # Exactly the documented files: nothing (a cache, a processed/ folder) was written next to them.
    assert on_disk == sorted(listed)
    for rel, md5 in listed.items():
        assert hashlib.md5((fixture_root / rel).read_bytes()).hexdigest() == md5, rel


@pytest.mark.full_data
@pytest.mark.parametrize("folder", ["MNIST", "FashionMNIST"])
def test_fixture_is_a_prefix_of_the_full_data(folder: str, fixture_root: Path, full_data_root: Path) -> None:
    # Each fixture idx file is the full file's header (with a smaller count) followed by its first records.
    for name in (f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")):
        small = (fixture_root / folder / "raw" / name).read_bytes()
        header = 16 if "images" in name else 8  # magic, count, then rows and columns for images
        with open(full_data_root / folder / "raw" / name, "rb") as f:
            full = f.read(len(small))
        assert small[:4] == full[:4] and small[8:header] == full[8:header] and small[header:] == full[header:], name


@pytest.mark.slow
@pytest.mark.full_data
def test_make_fixture_reproduces_the_shipped_files(full_data_root: Path) -> None:
    sys.path.insert(0, str(FIXTURES))
    try:
        import make_fixture
    finally:
        sys.path.remove(str(FIXTURES))
    assert make_fixture.main(["--source", str(full_data_root), "--check"]) == 0
