"""Storage URL -> Optuna RDBStorage with heartbeat, stale-trial retry and pool settings.

SQLite (the default, a file in the working directory) suits one machine; PostgreSQL
(`postgresql+psycopg://user@host/db`) suits many workers. Passwords never leave this module
unmasked: every message uses `mask_url`.
"""

from __future__ import annotations

import os
import random
import time

import warnings

import optuna
import sqlalchemy
import sqlalchemy.exc
from sqlalchemy.engine import make_url

DEFAULT_URL = "sqlite:///cnnsearch.db"
HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 60  # a RUNNING trial silent this long belongs to a dead worker


# Heartbeat and stale-trial retry have been "experimental" since Optuna 2.x; they are what
# keeps a multi-worker study honest, so say it once here rather than on every worker start.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class StorageError(ValueError):
    """The storage cannot be used; one line, password masked."""


def storage_url(url: str | None = None) -> str:
    """`--storage` -> $CNNSEARCH_STORAGE -> a SQLite file in the working directory."""
    return url or os.environ.get("CNNSEARCH_STORAGE") or DEFAULT_URL


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***; unparsable URLs are not echoed whole."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@")[-1] if "@" in url else url


def _retry_callback():
    # Renamed in Optuna 4.9; keep working on the older releases a GPU machine may have.
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    return cls(max_retry=1)


def engine_kwargs(url: str) -> dict:
    """Pool settings: pre-ping so a restarted PostgreSQL costs a reconnect, not a crash."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": 60}}  # wait for the writer lock instead of failing
    kwargs: dict = {"pool_pre_ping": True, "pool_recycle": 300, "pool_size": 2, "max_overflow": 4}
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 10}
    return kwargs


def _create_with_retry(url: str, heartbeat: dict, attempts: int = 6) -> optuna.storages.RDBStorage:
    """Several workers starting on an empty database race to create the schema; the losers
    see a duplicate-table/type error and simply try again once the winner is done."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url), **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
    raise AssertionError("unreachable")


def open_storage(url: str | None = None, *, heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
                 grace_period: int | None = GRACE_PERIOD) -> optuna.storages.RDBStorage:
    """Open (and create the tables of) the storage at `url`.

    Args:
        url: SQLAlchemy URL; None -> `storage_url()`.
        heartbeat_interval: seconds between heartbeats of a running trial; None disables the
            heartbeat (read-only uses such as status and reports).
        grace_period: seconds after which a silent RUNNING trial is failed and retried once.

    Raises:
        StorageError: malformed URL, unknown driver, or a database that cannot be reached.
    """
    url = storage_url(url)
    shown = mask_url(url)
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(f"malformed storage URL {shown!r} (expected e.g. sqlite:///cnnsearch.db "
                           "or postgresql+psycopg://user@host/db)") from None
    heartbeat = {}
    if heartbeat_interval:
        heartbeat = {"heartbeat_interval": heartbeat_interval,
                     "grace_period": grace_period or 3 * heartbeat_interval,
                     "heartbeat_stale_trial_callback": _retry_callback()}
    try:
        return _create_with_retry(url, heartbeat)
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageError(f"storage {shown}: unknown database driver {parsed.drivername!r}") from None
    except ModuleNotFoundError as exc:
        raise StorageError(f"storage {shown}: driver not installed ({exc.name})") from None
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
        where = parsed.host or parsed.database or shown
        reason = (str(getattr(exc, "orig", exc)).strip() or "unreachable").splitlines()[0]
        if parsed.password:
            reason = reason.replace(parsed.password, "***")
        raise StorageError(f"cannot reach the storage at {where} ({shown}): {reason}") from None


def count_trials(study: optuna.Study, states: tuple[str, ...], below: int | None = None) -> int:
    """Trials of `study` in `states` (numbered below `below`), counted by the database.

    The budget check runs before every trial; loading thousands of full trials for it would
    cost more than the trial bookkeeping itself, so this is one COUNT query.
    """
    storage = study._storage
    engine = getattr(storage, "engine", None)
    study_id = study._study_id
    if engine is None:  # in-memory storage (tests, notebooks)
        trials = study.get_trials(deepcopy=False)
        return sum(t.state.name in states and (below is None or t.number < below) for t in trials)
    query = ("SELECT COUNT(*) FROM trials WHERE study_id = :study AND state IN :states"
             + (" AND number < :below" if below is not None else ""))
    statement = sqlalchemy.text(query).bindparams(sqlalchemy.bindparam("states", expanding=True))
    with engine.connect() as conn:
        return conn.execute(statement, {"study": study_id, "states": list(states), "below": below}).scalar_one()
