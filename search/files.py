"""Files written so that nobody ever reads half of one: a temporary sibling, fsync, rename."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from search.errors import CnnsearchError


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write `path` through a temporary file in the same folder and `os.replace`.

    Readers see the old file or the new one, never a part; a crash, a full disk or a signal
    while writing leaves the previous file as it was. The file gets the mode a plain `open`
    would give it (0666 less the umask), not the temporary file's private 0600: exports,
    models and reports are meant to be shared.

    Args:
        path: the file to write.
        write: called with the open binary file; writes the content.

    Raises:
        CnnsearchError: the folder does not exist, `path` names a directory, or the file cannot
            be written (permissions, a full disk); the previous file, if any, is untouched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise CnnsearchError(f"{path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise CnnsearchError(f"{path} is a directory; give a file name")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CnnsearchError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # gone already after a successful replace
    return path


def _finite(value: Any) -> Any:
    """NaN/inf (a diverged run's loss) -> null: strict JSON readers (jq, browsers) reject NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return [_finite(v) for v in value] if isinstance(value, (list, tuple)) else value


def write_json(path: str | os.PathLike, doc: Any) -> Path:
    """`doc` as indented JSON, written atomically (`write_atomic`); NaN and inf become null."""
    return write_atomic(path, lambda f: f.write((json.dumps(_finite(doc), indent=2) + "\n").encode()))
