"""search.storage: the Optuna internals it relies on, the Store, and its shortcuts around Optuna's RDB
storage: TrialCache (how stale a worker's view may be, and what is never stale) and the
one-statement report (same semantics as Optuna's)."""

from __future__ import annotations

import math

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from search import storage
from search.storage import SYNC_SECONDS, TrialCache, open_storage
from studykit import pg_url  # noqa: F401 (fixture)


def _studies(tmp_path, worker_sync: float):
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    worker = open_storage(url, heartbeat_interval=None, sync_seconds=worker_sync)
    other = open_storage(url, heartbeat_interval=None)
    a = optuna.create_study(study_name="s", storage=worker, direction="maximize")
    b = optuna.load_study(study_name="s", storage=other)
    return a, b


def test_defaults_workers_batch_reads_readers_see_everything(tmp_path):
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    assert isinstance(open_storage(url), TrialCache)
    assert open_storage(url).sync_seconds == SYNC_SECONDS  # heartbeat on: a worker
    assert open_storage(url, heartbeat_interval=None).sync_seconds == 0.0  # status, report, dashboard


def test_another_workers_trial_shows_after_the_window_not_before(tmp_path):
    a, b = _studies(tmp_path, worker_sync=3600)
    assert len(a.get_trials()) == 0  # the first listing reads
    b.tell(b.ask(), 0.5)
    assert len(a.get_trials()) == 0  # within the window: served from memory
    a._storage.sync_seconds = 0.0
    assert [t.state for t in a.get_trials()] == [TrialState.COMPLETE]


def test_own_results_are_seen_at_once_whatever_the_window(tmp_path):
    a, b = _studies(tmp_path, worker_sync=3600)
    b.tell(b.ask(), 0.1)
    a.get_trials()
    mine = a.ask()
    a.tell(mine, 0.9)  # our own state change forces the next listing to read
    states = {t.number: (t.state, t.value) for t in a.get_trials()}
    assert states == {0: (TrialState.COMPLETE, 0.1), 1: (TrialState.COMPLETE, 0.9)}
    assert a.best_value == 0.9


def test_a_started_trial_reads_back_exactly_as_the_database_has_it(tmp_path):
    a, b = _studies(tmp_path, worker_sync=3600)
    trial = a.ask()
    served = trial._cached_frozen_trial  # what ask() read back (from memory)
    stored = b._storage.get_trial(trial._trial_id)  # what the database holds
    for field in ("number", "state", "params", "intermediate_values", "user_attrs", "system_attrs",
                  "datetime_start"):
        assert getattr(served, field) == getattr(stored, field), field
    trial.report(0.3, 0)
    # later reads of a running trial go to the database: another storage's write is visible
    b._storage.set_trial_user_attr(trial._trial_id, "note", "from b")
    assert a._storage.get_trial(trial._trial_id).user_attrs == {"note": "from b"}
    assert a._storage.get_trial(trial._trial_id).intermediate_values == {0: 0.3}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_reports_keep_optunas_semantics(tmp_path, backend, request):
    url = f"sqlite:///{tmp_path / 'r.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    study = optuna.create_study(study_name="r", storage=open_storage(url, heartbeat_interval=None))
    storage = study._storage._backend  # the RDB storage, below Optuna's cache
    trial = study.ask()
    for step, value in ((0, 0.5), (1, math.nan), (2, math.inf), (3, -math.inf), (0, 0.25)):  # step 0 again
        storage.set_trial_intermediate_value(trial._trial_id, step, value)
    got = storage.get_trial(trial._trial_id).intermediate_values
    assert got[0] == 0.25 and math.isnan(got[1]) and got[2] == math.inf and got[3] == -math.inf
    statements: list[str] = []
    sqlalchemy.event.listen(storage.engine, "before_cursor_execute",
                            lambda conn, cursor, statement, *rest: statements.append(statement))
    storage.set_trial_intermediate_value(trial._trial_id, 4, 0.75)  # the usual case: a new step
    assert len(statements) == 1 and statements[0].startswith("INSERT"), statements
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_intermediate_value(trial._trial_id, 5, 0.1)
    with pytest.raises(KeyError):
        storage.set_trial_intermediate_value(10 ** 8, 0, 0.1)


def _resolve(dotted: str):
    """`optuna.storages._cached_storage._CachedStorage` -> that class (None if any part is gone)."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            target = getattr(target, attr, None)
        return target
    return None


def test_every_optuna_internal_search_storage_uses_exists(tmp_path):
    """An Optuna release that renames a private name search/storage.py relies on fails here,
    by name, instead of in a worker at run time."""
    store = storage.open_store(f"sqlite:///{tmp_path / 'i.db'}", heartbeat_interval=None)
    study = optuna.create_study(study_name="i", storage=store.storage)
    live = {"_CachedStorage": store.storage, "Study": study, "Trial": study.ask()}
    missing = []
    for where, name in storage.OPTUNA_INTERNALS:
        if where == "instance":
            owner, attr = name.split(".")
            found = hasattr(live[owner], attr)
        else:
            found = hasattr(_resolve(where), name)
        if not found:
            missing.append(f"{where}.{name}")
    assert not missing, (f"search/storage.py uses Optuna internals that optuna {optuna.__version__} lacks: "
                         f"{', '.join(missing)}; adapt search/storage.py or bound optuna in pyproject.toml")


def test_open_store_opens_once_and_masks_the_password(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = storage.open_store(url, heartbeat_interval=None)
    assert storage.open_store(store) is store  # passed down, never reopened
    assert store.url == url and store.shown == url
    assert storage.mask_url("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u:***@h/db"


# --- read commands never create storage ------------------------------------------------------


def _tables(url: str) -> set[str]:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        return set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_a_reader_finds_no_sqlite_file_and_leaves_none(tmp_path, monkeypatch):
    """SQLite creates the file on connecting: a reader must look for it first, and say where."""
    from search.errors import StorageError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError) as err:
        open_storage("sqlite:///cnnsearch.db", heartbeat_interval=None, create=False)
    assert str(err.value) == (f"no database at {tmp_path / 'cnnsearch.db'} (sqlite:///cnnsearch.db); run "
                              "cnnsearch create or run first, or pass --storage URL")
    typo = f"sqlite:///{tmp_path / 'tpyo' / 'study.db'}"
    with pytest.raises(StorageError, match="no database at .*tpyo/study.db"):
        open_storage(typo, create=False)  # a worker's settings: heartbeat on
    assert list(tmp_path.iterdir()) == []


def test_a_reader_adds_no_tables_to_an_empty_or_foreign_sqlite_file(tmp_path):
    from search.errors import StorageError

    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StorageError, match=f"no cnnsearch tables in {empty} \\(sqlite:///"):
        open_storage(f"sqlite:///{empty}", heartbeat_interval=None, create=False)
    assert empty.stat().st_size == 0
    foreign = f"sqlite:///{tmp_path / 'foreign.db'}"
    engine = sqlalchemy.create_engine(foreign)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE notes (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(StorageError, match="no cnnsearch tables in"):
        open_storage(foreign, heartbeat_interval=None, create=False)
    assert _tables(foreign) == {"notes"}
    with pytest.raises(StorageError, match="no cnnsearch tables in sqlite://;"):
        open_storage("sqlite://", heartbeat_interval=None, create=False)  # in memory: nothing to read


def test_a_reader_opens_storage_that_create_made(tmp_path):
    url = f"sqlite:///{tmp_path / 'made.db'}"
    optuna.create_study(study_name="s", storage=open_storage(url, heartbeat_interval=None))
    tables = _tables(url)
    reader = open_storage(url, heartbeat_interval=None, create=False)
    assert [s.study_name for s in optuna.get_all_study_summaries(reader, include_best_trial=False)] == ["s"]
    assert _tables(url) == tables


def test_sqlite_path_is_the_file_sqlite_would_open(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = lambda url: storage.sqlite_path(sqlalchemy.engine.make_url(url))  # noqa: E731
    assert path("sqlite:///rel/x.db") == str(tmp_path / "rel" / "x.db")
    assert path(f"sqlite:///{tmp_path}/abs.db") == str(tmp_path / "abs.db")
    assert path(f"sqlite:///file:{tmp_path}/u.db?mode=ro&uri=true") == str(tmp_path / "u.db")
    assert path("sqlite://") is None and path("sqlite:///:memory:") is None


@pytest.mark.postgres
def test_a_reader_adds_no_tables_to_an_empty_postgres_database(pg_url):
    from search.errors import StorageError

    assert _tables(pg_url) == set()
    with pytest.raises(StorageError) as err:
        open_storage(pg_url, heartbeat_interval=None, create=False)
    assert str(err.value) == (f"no cnnsearch tables in {storage.mask_url(pg_url)}; run cnnsearch create or "
                              "run first, or pass --storage URL")
    assert _tables(pg_url) == set()
    open_storage(pg_url, heartbeat_interval=None)  # create: Optuna's tables
    assert {"studies", "trials", "version_info"} <= _tables(pg_url)
    assert isinstance(open_storage(pg_url, heartbeat_interval=None, create=False), TrialCache)
