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
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

DEFAULT_URL = "sqlite:///cnnsearch.db"
HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 60  # a RUNNING trial silent this long belongs to a dead worker
RETRIES = 1  # a trial cut off by a dead worker, a signal or a database outage runs again once


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


class _RDBStorage(optuna.storages.RDBStorage):
    """RDBStorage whose heartbeat covers a trial from its first moment and survives a restart.

    Optuna starts a trial's heartbeat only once the trial is set up (after the sampler's work
    in `ask`), and a RUNNING trial without any heartbeat is never stale: a worker killed in that
    window would hold a slot forever. So the first beat is written when the trial becomes
    RUNNING. And Optuna's heartbeat thread dies on its first failed write, after which a healthy
    trial goes stale; here a beat that cannot be written is skipped and the next one retries.
    """

    def _create_new_trial(self, study_id: int, template_trial=None):  # what Optuna's cache layer calls
        trial = super()._create_new_trial(study_id, template_trial)
        if self.heartbeat_interval and trial.state == TrialState.RUNNING:
            self.record_heartbeat(trial._trial_id)
        return trial

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        updated = super().set_trial_state_values(trial_id, state, values)
        if updated and state == TrialState.RUNNING and self.heartbeat_interval:
            self.record_heartbeat(trial_id)  # a WAITING trial (enqueued, or a retry) just claimed
        return updated

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:  # noqa: BLE001 - the thread must live; connection errors only
            if connection_problem(exc) is None:
                raise


def connection_problem(exc: BaseException) -> str | None:
    """One line saying why the database cannot be reached, if that is what `exc` (or its cause,
    e.g. the OperationalError inside Optuna's StorageInternalError) is about; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or \
                isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            text = str(getattr(exc, "orig", None) or exc).strip()
            return text.splitlines()[0] if text else exc.__class__.__name__
        exc = exc.__cause__ or exc.__context__
    return None


def _retry_callback():
    # Renamed in Optuna 4.9; keep working on the older releases a GPU machine may have.
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    return cls(max_retry=RETRIES)


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int | None:
    """Queue `trial` again as a WAITING copy, as Optuna's stale-trial retry does (same params
    and attrs, `failed_trial` / `retry_history` system attrs; its stop reason stays with the
    original), unless it was retried `RETRIES` times already. Returns the copy's id, or None."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > RETRIES:
        return None
    copy = optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k not in ("stop_reason", "error")},
        system_attrs={**trial.system_attrs, "failed_trial": history[0], "retry_history": history})
    return study._storage.create_new_trial(study._study_id, template_trial=copy)


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
            return _RDBStorage(url, engine_kwargs=engine_kwargs(url), **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                optuna.exceptions.StorageInternalError) as exc:
            # Seen on PostgreSQL: UniqueViolation on pg_type (two CREATE TYPE studydirection);
            # also possible: DuplicateTable, a duplicate alembic_version or version_info row.
            cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
            lost_race = isinstance(cause, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError))
            if attempt == attempts - 1 or not lost_race:
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
        reason = mask_text((str(getattr(exc, "orig", exc)).strip() or "unreachable").splitlines()[0], url)
        raise StorageError(f"cannot reach the storage at {where} ({shown}): {reason}") from None


def mask_text(text: str, url: str) -> str:
    """`text` (a driver's error message, say) with the password of `url` replaced by ***."""
    try:
        password = make_url(url).password
    except sqlalchemy.exc.ArgumentError:
        return text
    return text.replace(password, "***") if password else text


class Reconnect:
    """Waits 1, 2, 4, ... 16 s between attempts while the database is gone, and gives up with
    one clear StorageError once `limit` seconds have passed since it went away."""

    def __init__(self, url: str, limit: float):
        self.url, self.limit = url, limit
        self.since: float | None = None  # when the outage began (monotonic)
        self.delay = 1.0

    def waited(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since

    def wait(self, reason: str) -> None:
        self.since = time.monotonic() if self.since is None else self.since
        waited = self.waited()
        if waited >= self.limit:
            where = make_url(self.url).host or mask_url(self.url)
            raise StorageError(f"lost the storage at {where} ({mask_url(self.url)}) for {waited:.0f} s, "
                               f"giving up: {mask_text(reason, self.url)}")
        time.sleep(min(self.delay, self.limit - waited))
        self.delay = min(2 * self.delay, 16.0)

    def ok(self) -> None:
        self.since, self.delay = None, 1.0


def count_trials(study: optuna.Study, states: tuple[str, ...], below: int | None = None,
                 excluding: tuple[int, ...] | list[int] = ()) -> int:
    """Trials of `study` in `states` (numbered below `below`, other than `excluding`), counted
    by the database.

    The budget check runs before every trial; loading thousands of full trials for it would
    cost more than the trial bookkeeping itself, so this is one COUNT query.
    """
    storage = study._storage
    engine = getattr(getattr(storage, "_backend", storage), "engine", None)  # under Optuna's cache layer
    study_id = study._study_id
    if engine is None:  # in-memory storage (tests, notebooks)
        trials = study.get_trials(deepcopy=False)
        return sum(t.state.name in states and (below is None or t.number < below) and t.number not in excluding
                   for t in trials)
    query = ("SELECT COUNT(*) FROM trials WHERE study_id = :study AND state IN :states"
             + (" AND number < :below" if below is not None else "")
             + (" AND number NOT IN :excluding" if excluding else ""))
    statement = sqlalchemy.text(query).bindparams(sqlalchemy.bindparam("states", expanding=True))
    if excluding:
        statement = statement.bindparams(sqlalchemy.bindparam("excluding", expanding=True))
    with engine.connect() as conn:
        return conn.execute(statement, {"study": study_id, "states": list(states), "below": below,
                                        "excluding": list(excluding)}).scalar_one()
