"""A small filesystem of our own that tests can fill to the last byte: a real full disk.

Mounting a tmpfs needs root, which CI has. Without root the test that needs it is skipped
(nothing to install would help); as root, a mount that fails is a failure, not a skip."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); the boundary tests cover the logic")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.fail(f"mount -t tmpfs failed as root: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, chunk: int = 1 << 20) -> Path:
    """Write zeros into directory/filler until the filesystem refuses (ENOSPC); the file is returned
    so that the test can free the space again."""
    filler = directory / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * chunk)
            f.flush()
    return filler
