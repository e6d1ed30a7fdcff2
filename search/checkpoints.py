"""Training checkpoints: a `TrainState` (and what its caller needs to go on) as one file or bytes.

A checkpoint is `{"format": FORMAT, "state": state.state_dict(), **extra}` saved with
`torch.save`: plain data and tensors only, so it loads with `weights_only=True` (no pickled code
runs on load). Files go through `files.write_atomic`: a kill or a full disk while saving leaves
the previous checkpoint whole. Final training (`search.final`) keeps one per run folder; trial
checkpoints keep the bytes (`state_bytes`) wherever they like. No Optuna here.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from search.errors import CheckpointError, first_line
from search.files import write_atomic

if TYPE_CHECKING:
    from search.engine import TrainState

FORMAT = "cnnsearch-state/1"


def _doc(state: TrainState, extra: dict | None) -> dict:
    extra = dict(extra or {})
    clash = {"format", "state"} & set(extra)
    if clash:
        raise ValueError(f"checkpoint extra must not use the keys {sorted(clash)}")
    return {"format": FORMAT, "state": state.state_dict(), **extra}


def state_bytes(state: TrainState, extra: dict | None = None) -> bytes:
    """The checkpoint of `state` (plus `extra`, plain data and tensors) as bytes."""
    buf = io.BytesIO()
    torch.save(_doc(state, extra), buf)
    return buf.getvalue()


def save_state(path: str | os.PathLike, state: TrainState, extra: dict | None = None) -> Path:
    """Write the checkpoint of `state` (plus `extra`) to `path`, atomically (`files.write_atomic`).

    Raises:
        CnnsearchError: the file cannot be written; the previous checkpoint, if any, is untouched.
    """
    doc = _doc(state, extra)
    return write_atomic(path, lambda f: torch.save(doc, f))


def _load(source, name: str) -> dict:
    try:
        doc = torch.load(source, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, IndexError,
            KeyError, AttributeError, TypeError) as exc:
        first = first_line(exc)
        raise CheckpointError(f"{name}: not a readable cnnsearch training checkpoint (truncated or "
                              f"another kind of file: {first[:120]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("state"), dict):
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"{name}: not a cnnsearch training checkpoint (format {found!r}, "
                              f"expected {FORMAT!r})")
    return doc


def state_from_bytes(data: bytes, source: str) -> dict:
    """A checkpoint from `state_bytes`; `source` names it in errors (e.g. "trial 12's checkpoint").

    Returns the whole document: `doc["state"]` goes to `TrainState.resume` or `load_state_dict`,
    the rest is the caller's `extra`.

    Raises:
        CheckpointError: the bytes are truncated or not a cnnsearch checkpoint (one line).
    """
    return _load(io.BytesIO(data), source)


def load_state(path: str | os.PathLike) -> dict:
    """The checkpoint saved at `path` (tensors on the CPU), as `state_from_bytes` returns it.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated or not a cnnsearch checkpoint.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    return state_from_bytes(data, str(path))
