"""Storage URL -> Optuna RDBStorage with heartbeat, stale-trial retry and pool settings.

SQLite (the default, a file in the working directory) suits one machine; PostgreSQL
(`postgresql+psycopg://user@host/db`) suits many workers. Passwords never leave this module
unmasked: every message uses `mask_url`.

This is the only module that touches Optuna's private names (`OPTUNA_INTERNALS` lists them,
and tests/test_storage.py fails naming this module if an Optuna release drops one); pyproject
bounds Optuna to the releases it is tested with. A command opens its storage once, as a
`Store`, and passes it down.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime

import optuna
import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._rdb import models as rdb_models
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.errors import StorageError, StudyError, StudyGone
from search.urls import (DEFAULT_URL, NO_STORAGE_HINT, STORAGE_FILE_ENV, Reconnect, connection_problem,  # noqa: F401
                         mask_text, mask_url, read_storage_file, sqlite_path, storage_url)

HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 60  # a RUNNING trial silent this long belongs to a dead worker
RETRIES = 1  # a trial cut off by a dead worker, a signal or a database outage runs again once
SYNC_SECONDS = 1.0  # a worker re-reads other workers' trials at most this often (see TrialCache)

# Every private Optuna name this module uses: (module, attribute) for module-level names and
# ("instance", attribute) for attributes of live objects; tests/test_storage.py checks each one.
OPTUNA_INTERNALS = (
    ("optuna.storages._cached_storage", "_CachedStorage"),
    ("optuna.storages._rdb.models", "TrialModel"),
    ("optuna.storages._rdb.models", "TrialIntermediateValueModel"),
    ("optuna.storages._cached_storage._CachedStorage", "_read_trials_from_remote_storage"),
    ("optuna.storages.RDBStorage", "_create_new_trial"),
    ("instance", "_CachedStorage._backend"),
    ("instance", "_CachedStorage._lock"),
    ("instance", "_CachedStorage._studies"),
    ("instance", "_CachedStorage._trial_id_to_study_id_and_number"),
    ("instance", "Study._storage"),
    ("instance", "Study._study_id"),
    ("instance", "Trial._trial_id"),
    ("optuna.study._optimize", "_run_trial"),  # OPTIMIZE_LOGGER below is this module's logger
    ("optuna.storages._rdb.models", "BaseModel"),  # the schema: delete_study's tables
    ("optuna.storages._rdb.models", "StudyModel"),
    ("optuna.storages._rdb.models", "StudyUserAttributeModel"),
    ("optuna.storages._rdb.models", "TrialHeartbeatModel"),
    ("optuna.storages._rdb.models", "TrialUserAttributeModel"),
    ("instance", "_CachedStorage._study_id_and_number_to_trial_id"),
)
# Optuna logs "Trial N failed with ..." (and its traceback) on this logger; the worker filters it.
OPTIMIZE_LOGGER = "optuna.study._optimize"


# Heartbeat and stale-trial retry have been "experimental" since Optuna 2.x; they are what
# keeps a multi-worker study honest, so say it once here rather than on every worker start.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


UID_ATTR = "cnnsearch_uid"  # study user attr: a uuid set at create, so a re-created study is another one


@dataclass(frozen=True)
class Store:
    """One command's storage, opened once and passed down: the URL it came from and the Optuna
    storage over it (the artifact store for checkpoints will sit here too)."""

    url: str
    storage: "TrialCache"

    @property
    def shown(self) -> str:
        """The URL with its password masked: the only form that is ever printed."""
        return mask_url(self.url)


def open_store(url: "str | Store | None" = None, **kwargs) -> Store:
    """A Store for `url` (None: `storage_url()`); a Store given is returned as it is.

    Keyword arguments are `open_storage`'s (heartbeat_interval, grace_period, sync_seconds,
    create: False for every command that reads or works on existing studies).
    """
    if isinstance(url, Store):
        return url
    url = storage_url(url)
    return Store(url, open_storage(url, **kwargs))


def storage_of(study: optuna.Study):
    """The storage a study was loaded from (Optuna keeps it private)."""
    return study._storage


def trial_id(trial) -> int:
    """The storage id of a live `optuna.Trial` or a `FrozenTrial`."""
    return trial._trial_id


def stored_trial(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """A live trial as the storage has it now (attributes other workers may have written)."""
    return trial.study._storage.get_trial(trial._trial_id)


def started_trial(study: optuna.Study) -> int | None:
    """The id of the trial this process last set RUNNING in `study`'s storage (created or
    claimed by `ask`), or None: where `ask` failed after that (a sampler's `before_trial`),
    the only way to find the trial it left RUNNING."""
    return getattr(study._storage, "last_started", None)


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

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        """A report in one statement: insert the value if the trial is RUNNING. Optuna's own path
        (three statements in an ORM session, ~3.6 ms against ~1 ms) takes every other case: a
        step reported again, a finished or unknown trial (its errors), a race."""
        model = rdb_models.TrialIntermediateValueModel
        values, trials = model.__table__, rdb_models.TrialModel.__table__
        stored, kind = model.intermediate_value_to_stored_repr(intermediate_value)
        row = sqlalchemy.select(
            sqlalchemy.literal(trial_id, values.c.trial_id.type), sqlalchemy.literal(step, values.c.step.type),
            sqlalchemy.literal(stored, values.c.intermediate_value.type),
            sqlalchemy.literal(kind, values.c.intermediate_value_type.type),
        ).where((trials.c.trial_id == trial_id) & (trials.c.state == TrialState.RUNNING))
        insert = values.insert().from_select(
            ["trial_id", "step", "intermediate_value", "intermediate_value_type"], row,
        ).returning(values.c.step)  # rowcount is not reliable for INSERT ... SELECT; RETURNING is
        if self.engine.dialect.insert_returning:  # PostgreSQL, SQLite; not MySQL
            try:
                with self.engine.begin() as conn:
                    if conn.execute(insert).first() is not None:
                        return
            except sqlalchemy.exc.IntegrityError:
                pass  # this step has a value already: Optuna's path overwrites it
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:  # noqa: BLE001 - the thread must live; connection errors only
            if connection_problem(exc) is None:
                raise


class TrialCache(_CachedStorage):
    """Optuna's trial cache, re-read from the database at most every `sync_seconds`.

    Optuna's cache re-reads every unfinished trial with all its rows (six queries) each time
    anyone lists the trials: the pruner on every `should_prune`, the sampler on every `ask`. Here
    a listing within `sync_seconds` of the last read is served from memory, so another worker's
    progress may reach this one that much later; this worker's own state changes (tell, fail)
    re-read at once, so a single worker always sees its own finished trials.
    Every write goes to the database, and so does every read of one running trial, except the
    first read of a trial this worker has just started (`ask` reads it back at once; it is
    exactly what was inserted, since nobody else writes to a trial in its first minute).
    """

    def __init__(self, backend: optuna.storages.RDBStorage, sync_seconds: float = SYNC_SECONDS):
        super().__init__(backend)
        self.sync_seconds = sync_seconds
        self._read_at: dict[int, float] = {}  # study id -> monotonic time of the last read
        self._started: dict[int, optuna.trial.FrozenTrial] = {}  # trial id -> as inserted, until first read
        self.last_started: int | None = None  # the trial this process last set RUNNING (see started_trial)
        self._watched: dict[int, tuple[str, str | None]] = {}  # study id -> (name, uid): see watch()
        self._writing = threading.local()  # .study: the watched study this thread is writing to
        if self.engine.dialect.name == "sqlite":
            sqlalchemy.event.listen(self.engine, "commit", self._recheck_before_commit)

    @property
    def engine(self) -> sqlalchemy.Engine:
        return self._backend.engine

    # --- a worker's study deleted under it ------------------------------------------------------
    # `delete --force` or `create --replace --force` may delete the study a worker runs on. On
    # SQLite a study created next can take the same study id, and its trials the same trial ids,
    # so a write by id could land in the new study. A worker therefore watches its study: before
    # every write to one of its trials (and before a new trial) the study is checked to be still
    # there under its name with the uid it had (UID_ATTR), else StudyGone. One small query.
    # A replace can still land between that check and the write (seen once in CI: the old
    # worker's `checkpoint` attr in the new study's trial), and SQLite's foreign keys cannot see
    # it when the ids are reused. So on SQLite the check runs again inside the write's own
    # transaction, after its INSERTs and UPDATEs, as it commits (the engine's `commit` event,
    # which sees Optuna's ORM sessions and the plain connections alike): the write then holds
    # SQLite's one write lock, no replace can commit before it does, and a failed check rolls
    # the write back.

    def watch(self, study_id: int, name: str, uid: str | None) -> None:
        self._watched[study_id] = (name, uid)

    def unwatch(self, study_id: int) -> None:
        self._watched.pop(study_id, None)

    def check_study(self, study_id: int) -> None:
        """Raise StudyGone if the watched study `study_id` was deleted (or deleted and created
        again); nothing for a study that is not watched."""
        watched = self._watched.get(study_id)
        if watched is not None:
            gone = study_gone(self.engine, study_id, *watched)
            if gone is not None:
                raise StudyGone(gone)

    def _check_trial(self, trial_id: int) -> int | None:
        """check_study for the trial's study; returns that study's id when it is watched."""
        if self._watched:
            where = self._trial_id_to_study_id_and_number.get(trial_id)
            if where is not None and where[0] in self._watched:
                self.check_study(where[0])
                return where[0]
        return None

    def _write(self, study_id: int | None, write, *args):
        """Run Optuna's `write(*args)` as a write to watched study `study_id` (None: not watched)."""
        self._writing.study = study_id
        try:
            return write(*args)
        finally:
            self._writing.study = None

    def _recheck_before_commit(self, conn: sqlalchemy.Connection) -> None:
        """SQLite, as a write commits: the watched study this thread writes to is still itself,
        asked on the write's own DBAPI connection, inside its transaction, after all its
        statements; else the write is rolled back and StudyGone raised."""
        study_id = getattr(self._writing, "study", None)
        watched = self._watched.get(study_id) if study_id is not None else None
        if watched is not None:
            dbapi = conn.connection.dbapi_connection
            gone = _gone_sqlite(dbapi, study_id, *watched)
            if gone is not None:
                dbapi.rollback()
                raise StudyGone(gone)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution) -> None:
        self._write(self._check_trial(trial_id), super().set_trial_param, trial_id, param_name,
                    param_value_internal, distribution)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._write(self._check_trial(trial_id), super().set_trial_intermediate_value, trial_id, step,
                    intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value) -> None:
        self._write(self._check_trial(trial_id), super().set_trial_user_attr, trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value) -> None:
        self._write(self._check_trial(trial_id), super().set_trial_system_attr, trial_id, key, value)

    def record_heartbeat(self, trial_id: int) -> None:
        """The heartbeat thread's beat; once the trial's study is gone, nothing (the thread must
        not die with a traceback: the worker stops at its next write, with one line)."""
        try:
            self._write(self._check_trial(trial_id), super().record_heartbeat, trial_id)
        except StudyGone:
            return
        except Exception as exc:
            if connection_problem(exc) is not None:
                return  # the database is away (the check's query too): the next beat tries again
            try:
                gone = self._trial_gone(trial_id)
            except Exception:  # noqa: BLE001
                gone = False
            if gone:
                return  # deleted with its study while this beat waited for the delete's locks
            raise

    def _trial_gone(self, trial_id: int) -> bool:
        try:
            self._check_trial(trial_id)
        except StudyGone:
            return True
        trials = rdb_models.TrialModel.__table__
        with self.engine.connect() as conn:
            return conn.execute(sqlalchemy.select(trials.c.trial_id).where(trials.c.trial_id == trial_id)).first() is None

    def delete_study(self, study_id: int) -> None:
        """Delete the study with all its rows, in one transaction that first locks the study and
        its trials (PostgreSQL), so that a worker's insert at the same moment waits and then
        fails instead of rolling the delete back (Optuna's own delete ignores that rollback);
        then make sure it is gone, trying again a few times. Raises KeyError for an unknown id
        (as Optuna does) and StudyError when the study is still there after the last try."""
        with self._lock:
            if study_id in self._studies:
                for number in self._studies[study_id].trials:
                    trial_id = self._study_id_and_number_to_trial_id.pop((study_id, number), None)
                    self._trial_id_to_study_id_and_number.pop(trial_id, None)
                del self._studies[study_id]
        self._read_at.pop(study_id, None)
        _delete_study_rows(self.engine, study_id)

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        now = time.monotonic()
        if now - self._read_at.get(study_id, -math.inf) < self.sync_seconds:
            return
        super()._read_trials_from_remote_storage(study_id)
        self._read_at[study_id] = now

    def create_new_trial(self, study_id: int, template_trial=None) -> int:
        self.check_study(study_id)
        trial_id = self._write(study_id if study_id in self._watched else None, super().create_new_trial,
                               study_id, template_trial)
        with self._lock:
            _, number = self._trial_id_to_study_id_and_number[trial_id]
            trial = self._studies[study_id].trials[number]
            if trial.state == TrialState.RUNNING:  # a WAITING one (a retry) is for any worker to claim
                self._started[trial_id] = trial
                self.last_started = trial_id
        return trial_id

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        with self._lock:
            started = self._started.pop(trial_id, None)
        return copy.deepcopy(started) if started is not None else super().get_trial(trial_id)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        watched = self._check_trial(trial_id)
        self._started.pop(trial_id, None)
        updated = self._write(watched, super().set_trial_state_values, trial_id, state, values)
        if updated and state == TrialState.RUNNING:
            self.last_started = trial_id  # a WAITING trial claimed by `ask`
        self._read_at.clear()
        if updated and state.is_finished() and trial_id in self._trial_id_to_study_id_and_number:
            # Re-read now: `tell` reads the finished trial back at once (then from memory), and
            # the next `ask` lists the study within the window.
            self._read_trials_from_remote_storage(self._trial_id_to_study_id_and_number[trial_id][0])
        return updated


def _identity(conn, study_id: int) -> tuple[str, str | None] | None:
    """(name, uid) of study `study_id`, or None: one query."""
    studies, attrs = rdb_models.StudyModel.__table__, rdb_models.StudyUserAttributeModel.__table__
    row = conn.execute(
        sqlalchemy.select(studies.c.study_name, attrs.c.value_json)
        .select_from(studies.outerjoin(attrs, (attrs.c.study_id == studies.c.study_id) & (attrs.c.key == UID_ATTR)))
        .where(studies.c.study_id == study_id)).first()
    return None if row is None else (row[0], None if row[1] is None else json.loads(row[1]))


def study_gone(engine: sqlalchemy.Engine, study_id: int, name: str, uid: str | None) -> str | None:
    """None while study `study_id` is still the study `name` with `uid`; else one line saying
    what became of it."""
    with engine.connect() as conn:
        if _identity(conn, study_id) == (name, uid):
            return None
        studies = rdb_models.StudyModel.__table__
        again = conn.execute(sqlalchemy.select(studies.c.study_id).where(studies.c.study_name == name)).first()
    return _gone_line(name, again is not None)


def _gone_line(name: str, again: bool) -> str:
    return f"study {name!r} was deleted" + (" and created again" if again else "")


def _gone_sqlite(dbapi, study_id: int, name: str, uid: str | None) -> str | None:
    """study_gone on a sqlite3 connection, inside its open transaction (plain SQL: it runs while
    SQLAlchemy commits that connection)."""
    row = dbapi.execute(
        "SELECT s.study_name, a.value_json FROM studies s LEFT JOIN study_user_attributes a"
        " ON a.study_id = s.study_id AND a.key = ? WHERE s.study_id = ?", (UID_ATTR, study_id)).fetchone()
    if row is not None and (row[0], None if row[1] is None else json.loads(row[1])) == (name, uid):
        return None
    again = dbapi.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone()
    return _gone_line(name, again is not None)


def watch_study(study: optuna.Study) -> int | None:
    """Make the worker's storage check, before each write, that `study` is still the study it
    loaded (see TrialCache.watch); returns what `unwatch_study` takes."""
    storage = study._storage
    if not isinstance(storage, TrialCache):
        return None
    storage.watch(study._study_id, study.study_name, study.user_attrs.get(UID_ATTR))
    return study._study_id


def unwatch_study(study: optuna.Study) -> None:
    if isinstance(study._storage, TrialCache):
        study._storage.unwatch(study._study_id)


def delete_study(study: optuna.Study) -> None:
    """Delete exactly this study (by its id, not its name; see TrialCache.delete_study)."""
    study._storage.delete_study(study._study_id)


def check_study(study: optuna.Study) -> None:
    """StudyGone if the watched `study` was deleted or replaced (a worker's check before a trial
    and when it handles an error)."""
    if isinstance(study._storage, TrialCache):
        study._storage.check_study(study._study_id)


def live_trials(study: optuna.Study, grace: float = GRACE_PERIOD) -> list[dict]:
    """The RUNNING trials of `study` whose worker is alive: a heartbeat within `grace` seconds
    (database clock), or, without any heartbeat, started within `grace` seconds. Each as
    {"number", "host", "beat_s"} (beat_s: seconds since the last heartbeat, None without one)."""
    storage = study._storage
    engine = getattr(getattr(storage, "_backend", storage), "engine", None)
    if engine is None:  # in-memory storage
        return [{"number": t.number, "host": t.user_attrs.get("host"), "beat_s": None}
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    trials, beats = rdb_models.TrialModel.__table__, rdb_models.TrialHeartbeatModel.__table__
    attrs = rdb_models.TrialUserAttributeModel.__table__
    query = (sqlalchemy.select(trials.c.number, trials.c.datetime_start, beats.c.heartbeat, attrs.c.value_json)
             .select_from(trials.outerjoin(beats, beats.c.trial_id == trials.c.trial_id)
                          .outerjoin(attrs, (attrs.c.trial_id == trials.c.trial_id) & (attrs.c.key == "host")))
             .where((trials.c.study_id == study._study_id) & (trials.c.state == TrialState.RUNNING))
             .order_by(trials.c.number))
    with engine.connect() as conn:
        now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar().replace(tzinfo=None)
        rows = conn.execute(query).all()
    live = []
    for number, started, beat, host in rows:
        if beat is not None:
            age = (now - beat.replace(tzinfo=None)).total_seconds()
        elif started is not None:
            age = (datetime.now() - started).total_seconds()  # Optuna's clock for datetime_start
        else:
            age = math.inf
        if age <= grace:
            live.append({"number": number, "host": None if host is None else json.loads(host),
                         "beat_s": None if beat is None else max(0.0, age)})
    return live


DELETE_ATTEMPTS = 5


def _delete_study_rows(engine: sqlalchemy.Engine, study_id: int, attempts: int = DELETE_ATTEMPTS) -> None:
    """TrialCache.delete_study's work: every row of the study, children first, in one transaction."""
    meta = rdb_models.BaseModel.metadata
    studies, trials = rdb_models.StudyModel.__table__, rdb_models.TrialModel.__table__
    with engine.connect() as conn:
        identity = _identity(conn, study_id)
    if identity is None:
        raise KeyError(f"No study with study_id {study_id} exists.")
    name = identity[0]
    reason = "it was still there after the delete"
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                if engine.dialect.name != "sqlite":  # SQLite: the first DELETE takes the one write lock
                    # A new trial needs a key-share lock on its study row, a new row of a trial one on
                    # the trial's row: taken here first, such inserts wait for this delete, then fail.
                    conn.execute(sqlalchemy.select(studies.c.study_id)
                                 .where(studies.c.study_id == study_id).with_for_update())
                    conn.execute(sqlalchemy.select(trials.c.trial_id)
                                 .where(trials.c.study_id == study_id).with_for_update())
                ids = sqlalchemy.select(trials.c.trial_id).where(trials.c.study_id == study_id)
                for table in reversed(meta.sorted_tables):  # every table before those it refers to
                    for fk in table.foreign_keys:
                        if fk.column.table is trials:
                            conn.execute(table.delete().where(fk.parent.in_(ids)))
                        elif fk.column.table is studies:
                            conn.execute(table.delete().where(fk.parent == study_id))
                conn.execute(studies.delete().where(studies.c.study_id == study_id))
        except sqlalchemy.exc.DBAPIError as exc:  # a deadlock, a lost connection: try again
            text = str(getattr(exc, "orig", None) or exc).strip()
            reason = text.splitlines()[0] if text else exc.__class__.__name__
        try:
            with engine.connect() as conn:
                now = _identity(conn, study_id)
        except sqlalchemy.exc.DBAPIError as exc:
            text = str(getattr(exc, "orig", None) or exc).strip()
            reason, confirmed = (text.splitlines()[0] if text else exc.__class__.__name__), False
        else:
            if now is None or now[1] not in (None, identity[1]):  # gone; on SQLite a new study may have its id
                return
            confirmed = True
        time.sleep(0.1 * (attempt + 1) + random.random() * 0.1)
    if confirmed:
        raise StudyError(f"study {name!r} is still there after {attempts} tries to delete it ({reason}); "
                         "stop its workers and try again")
    raise StudyError(f"could not confirm that study {name!r} was deleted ({reason}); see `cnnsearch list`")


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


def _foreign_keys_on(dbapi_connection, _record) -> None:
    dbapi_connection.execute("PRAGMA foreign_keys = ON")


def _enforce_foreign_keys(engine: sqlalchemy.Engine) -> None:
    """Make SQLite enforce the schema's foreign keys on every connection of `engine`, as
    PostgreSQL does. SQLite leaves them off by default, and then a worker's write that lands
    just after `delete --force` removed its trial (the watch's check passed a moment before)
    leaves an orphan row; with them on, that write fails and nothing is stored. The
    connections RDBStorage opened before the listener are closed, so that every one has it."""
    sqlalchemy.event.listen(engine, "connect", _foreign_keys_on)
    engine.dispose()


def _create_with_retry(url: str, heartbeat: dict, attempts: int = 6, create: bool = True) -> optuna.storages.RDBStorage:
    """Several workers starting on an empty database race to create the schema; the losers
    see a duplicate-table/type error and simply try again once the winner is done. With
    `create` False the tables are known to be there (`_require_tables`) and none is created."""
    for attempt in range(attempts):
        try:
            storage = _RDBStorage(url, engine_kwargs=engine_kwargs(url), skip_table_creation=not create, **heartbeat)
            if storage.engine.dialect.name == "sqlite":
                _enforce_foreign_keys(storage.engine)
            return storage
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
                 grace_period: int | None = GRACE_PERIOD, sync_seconds: float | None = None,
                 create: bool = True) -> TrialCache:
    """Open (and, with `create`, create the file and the tables of) the storage at `url`.

    Args:
        url: SQLAlchemy URL; None -> `storage_url()`.
        create: True for the commands that make studies (create, run): a missing SQLite file
            and missing tables are created. False for everything else (status, best, list,
            export, report, dashboard, delete, worker, launch): storage without cnnsearch's
            tables is an error saying where it looked, and nothing is created, not even the
            empty file SQLite makes on connecting (a typo in a worker's URL leaves no file).
        heartbeat_interval: seconds between heartbeats of a running trial; None disables the
            heartbeat (read-only uses such as status and reports).
        grace_period: seconds after which a silent RUNNING trial is failed and retried once.
        sync_seconds: how stale a trial listing may be (see TrialCache); None -> SYNC_SECONDS
            for a worker (heartbeat on), 0 (always current) for readers such as status.

    Raises:
        StorageError: malformed URL, unknown driver, or a database that cannot be reached; with
            `create` False also a missing SQLite file or a database without the tables.
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
                     "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)}
    try:
        if sync_seconds is None:
            sync_seconds = SYNC_SECONDS if heartbeat_interval else 0.0
        if not create:
            _require_tables(url, parsed)
        return TrialCache(_create_with_retry(url, heartbeat, create=create), sync_seconds)
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageError(f"storage {shown}: unknown database driver {parsed.drivername!r}") from None
    except ModuleNotFoundError as exc:
        raise StorageError(f"storage {shown}: driver not installed ({exc.name})") from None
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
        where = parsed.host or parsed.database or shown
        reason = mask_text((str(getattr(exc, "orig", exc)).strip() or "unreachable").splitlines()[0], url)
        raise StorageError(f"cannot reach the storage at {where} ({shown}): {reason}") from None


REQUIRED_TABLES = ("studies", "version_info")  # Optuna's schema; RDBStorage fails without either


def _require_tables(url: str, parsed) -> None:
    """StorageError unless the storage at `url` exists and has Optuna's tables; creates nothing.

    SQLite creates a missing file on connecting, so the file is looked for first; then the
    tables are listed on a connection of their own (RDBStorage would create them, or fail on
    the version table, before anything could be checked)."""
    shown = mask_url(url)
    where = shown
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(parsed)
        if path is not None:
            if not os.path.exists(path):
                raise StorageError(f"no database at {path} ({shown}); {NO_STORAGE_HINT}")
            where = f"{path} ({shown})"
    connect_args = engine_kwargs(url).get("connect_args", {})
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if not set(REQUIRED_TABLES) <= tables:
        raise StorageError(f"no cnnsearch tables in {where}; {NO_STORAGE_HINT}")


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


def claim_numbered_attr(study: optuna.Study, prefix: str, value, attempts: int = 1000) -> int:
    """Record study user attr `<prefix><k>` = value for the smallest k above every one recorded,
    atomically, and return k: the INSERT goes straight to the attributes table, whose unique
    (study, key) constraint fails a second process's insert of the same key; that process then
    tries the next k. In-memory storage (one process) just sets the attr."""
    def taken(keys) -> list[int]:
        return [int(k[len(prefix):]) for k in keys if k.startswith(prefix) and k[len(prefix):].isdigit()]

    engine = getattr(getattr(study._storage, "_backend", study._storage), "engine", None)
    if engine is None:
        k = 1 + max(taken(study.user_attrs), default=-1)
        study.set_user_attr(f"{prefix}{k}", value)
        return k
    attrs = rdb_models.StudyUserAttributeModel.__table__
    mine = attrs.c.study_id == study._study_id
    for _ in range(attempts):
        with engine.connect() as conn:
            keys = conn.execute(sqlalchemy.select(attrs.c.key).where(
                mine & attrs.c.key.like(f"{prefix}%"))).scalars().all()
        k = 1 + max(taken(keys), default=-1)
        try:
            with engine.begin() as conn:
                conn.execute(attrs.insert().values(study_id=study._study_id, key=f"{prefix}{k}",
                                                   value_json=json.dumps(value)))
            return k
        except sqlalchemy.exc.IntegrityError:
            continue  # another process took this k a moment ago: the next one
    raise AssertionError(f"no free {prefix}<k> after {attempts} attempts")  # a bug, not a race


def trials_by_state(study: optuna.Study) -> dict[str, int]:
    """{state name: trial count} for `study`, from one GROUP BY query (status on a 10,000-trial
    study should not load 10,000 trials)."""
    engine = getattr(getattr(study._storage, "_backend", study._storage), "engine", None)
    if engine is None:  # in-memory storage
        counts: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        return counts
    query = sqlalchemy.text("SELECT state, COUNT(*) FROM trials WHERE study_id = :study GROUP BY state")
    with engine.connect() as conn:
        return {getattr(state, "name", str(state)): n for state, n in conn.execute(query, {"study": study._study_id})}


def trials_in_state(study: optuna.Study, state: TrialState) -> list[optuna.trial.FrozenTrial]:
    """The trials of `study` in `state`, filtered by the database rather than after loading all."""
    backend = getattr(study._storage, "_backend", study._storage)
    return backend.get_all_trials(study._study_id, deepcopy=False, states=(state,))

