"""Output paths for exports: refuse to overwrite, write under a temporary name, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tunelab.errors import CheckpointError


def check_new_output(out: str | Path) -> Path:
    """`out` as a Path; CheckpointError when it is an existing file or a non-empty directory."""
    out = Path(out).expanduser()
    if out.is_dir():
        if any(out.iterdir()):
            raise CheckpointError(f"{out}: output directory exists and is not empty (nothing was overwritten)")
    elif out.exists():
        raise CheckpointError(f"{out}: output file exists (nothing was overwritten)")
    return out


def _temporary_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def staged_directory(out: str | Path) -> Iterator[Path]:
    """A fresh temporary directory beside `out`, renamed to `out` when the block finishes without error.

    An empty directory already at `out` is replaced; a failure removes the temporary directory.
    """
    out = check_new_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_new_output(out)  # nothing appeared there meanwhile
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_file(out: str | Path) -> Iterator[Path]:
    """A temporary file name beside `out`, renamed to `out` when the block finishes without error."""
    out = check_new_output(out)
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; give the path of the file to write (e.g. {out / 'model.gguf'})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(out)
    try:
        yield tmp
        check_new_output(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
