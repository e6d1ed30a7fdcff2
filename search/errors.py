"""The project's error types: everything a user can cause, and fix, is a `CnnsearchError`.

`cli.py` shows a CnnsearchError as one line (`error: ...`, exit code 1). Any other exception is
a bug in cnnsearch or in what it runs on, and the CLI lets it show its traceback. So library code
raises these for bad files, keys, values, names, paths, URLs and devices, and nothing else.
"""

from __future__ import annotations


class CnnsearchError(Exception):
    """Something the user asked for cannot be done as given; the message is one line saying what."""


class ConfigError(CnnsearchError):
    """A bad RunConfig value or key; the message names the key."""


class SpecError(CnnsearchError):
    """A bad study file: `<file>: <key>: <what was expected>`."""


class SpaceError(CnnsearchError):
    """A bad search-space definition, or parameters that do not belong to the space."""


class DataError(CnnsearchError):
    """A dataset problem: unknown options, a split that cannot be made, unreadable files."""


class DatasetNotFound(DataError):
    """The dataset's files are not in the data directory (and download was not asked for)."""


class StorageError(CnnsearchError):
    """The storage cannot be used (malformed URL, missing driver, unreachable); password masked."""


class StudyError(CnnsearchError):
    """A study-level problem: unknown name, a conflicting spec, no finished trial."""


class TrialsCrashed(StudyError):
    """A worker's trials crashed several times in a row (`worker.MAX_CRASHES_IN_A_ROW`): a bug in
    the space, the data or the machine to fix, not to loop on; the message names the last error."""


class StudyGone(StudyError):
    """The study a worker runs on was deleted (or deleted and created again) under it."""


class ExportError(CnnsearchError):
    """An export or final-training request that cannot be carried out."""


class CheckpointError(CnnsearchError):
    """A file that is not a readable cnnsearch model file, or an unreadable image."""


class DeviceError(CnnsearchError):
    """A training device that does not exist here (e.g. cuda on a machine without a GPU)."""


class LaunchError(CnnsearchError):
    """Worker processes cannot be planned as asked (bad --gpus list, no GPU)."""


class DashboardError(CnnsearchError):
    """The dashboard cannot listen where asked."""


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of `exc`'s message (its class name when it has none), for a one-line
    report; `with_type` prefixes the class name (`RuntimeError: CUDA out of memory.`), as trial
    attributes record a crash."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return exc.__class__.__name__
    return f"{exc.__class__.__name__}: {lines[0]}" if with_type else lines[0]


class OverBudget(Exception):
    """Not a user's error: a trial or final-stage job that is not run because another worker took
    the study's last slot, or the job, at the same moment. The worker counts it, shows one line."""
