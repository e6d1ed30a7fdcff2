"""Trial checkpoints in an Optuna artifact store: where it is, and one trial's latest checkpoint.

Where (`artifact_dir`, first found): the command's `--artifacts PATH`, `$CNNSEARCH_ARTIFACTS`,
else for a SQLite database the directory `<db stem>-artifacts/` beside its file; for any other
storage (PostgreSQL) none, and trials keep no checkpoints. `none` (or `off`) turns them off. The
directory is a `optuna.artifacts.FileSystemArtifactStore`, local or shared (NFS): a retry resumes
from a checkpoint only where its worker sees the directory the dead worker wrote to; elsewhere it
trains from scratch with a `resume_error`. (S3 / GCS stores are not wired in yet.)

What (`TrialCheckpoint`): after each epoch a trial saves its `TrainState` (`checkpoints.state_bytes`)
as a new artifact, records the artifact id in its user attr `checkpoint`, then removes the one
before: one checkpoint per running trial. A finished trial (complete, pruned, crashed) removes its
own; a trial cut off (killed worker, signal, database outage) keeps it for its retry, which
copies the `checkpoint` attr with the rest (Optuna's stale-trial retry and `storage.requeue` both
copy user attrs at the moment the original is failed, after which it can write nothing more).

The artifacts are written with the store's own `write`/`open_reader`/`remove`, not
`optuna.artifacts.upload_artifact`: that one adds an `artifacts:<id>` system attr per upload which
nothing ever removes, so a trial would list one artifact per epoch, all but one of them deleted
files, and its retry would copy the list.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from sqlalchemy.engine import make_url

from search.errors import CheckpointError, CnnsearchError, first_line
from search.urls import sqlite_path

ARTIFACTS_ENV = "CNNSEARCH_ARTIFACTS"
CHECKPOINT_ATTR = "checkpoint"  # trial user attr: the artifact id of the trial's latest checkpoint
OFF = ("none", "off")


def artifact_dir(url: str, given: str | os.PathLike | None = None) -> Path | None:
    """The artifact directory for the storage at `url`: `given`, else $CNNSEARCH_ARTIFACTS, else
    `<db stem>-artifacts` beside a SQLite file; None when off or there is no default (PostgreSQL,
    an in-memory SQLite)."""
    if given is None:
        given = os.environ.get(ARTIFACTS_ENV) or None
    if given is not None:
        text = str(given).strip()
        if text.lower() in OFF:
            return None
        if "://" in text:
            raise CnnsearchError(f"--artifacts {text!r}: only a directory (local or shared) is supported "
                                 "for trial checkpoints, not a URL")
        return Path(text).expanduser().resolve()
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - the storage itself reports a bad URL
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    db = sqlite_path(parsed)
    if db is None:
        return None
    db = Path(db)
    return db.with_name(f"{db.stem}-artifacts")


class CheckpointStore:
    """Trial checkpoints as artifacts of one `FileSystemArtifactStore` (`where`: its directory)."""

    def __init__(self, where: Path):
        self.where = Path(where)
        try:
            self.where.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CnnsearchError(f"artifact directory {self.where}: cannot create it "
                                 f"({exc.strerror or exc})") from None
        self.store = FileSystemArtifactStore(self.where)

    def save(self, state, extra: dict | None = None, prefix: str = "") -> str:
        """Write the checkpoint of `state` as a new artifact named `<prefix><uuid>.pt`; its id.
        OSError: not written."""
        from search import checkpoints  # torch: only for a command that trains

        artifact_id = f"{prefix}{uuid.uuid4()}.pt"
        data = checkpoints.state_bytes(state, extra)
        try:
            self.store.write(artifact_id, io.BytesIO(data))
        except BaseException:
            self.remove(artifact_id)  # a partial file must not stay
            raise
        return artifact_id

    def load(self, artifact_id: str, source: str) -> dict:
        """The checkpoint document (`checkpoints.state_from_bytes`) stored as `artifact_id`.

        Raises:
            CheckpointError: gone from the store, unreadable, or not a checkpoint (one line).
        """
        try:
            with self.store.open_reader(artifact_id) as reader:
                data = reader.read()
        except ArtifactNotFound:
            raise CheckpointError(f"{source} ({artifact_id}) is not in the artifact directory {self.where}") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{source} ({artifact_id}): cannot read it ({exc})") from None
        from search import checkpoints

        return checkpoints.state_from_bytes(data, source)

    def remove(self, artifact_id: str) -> None:
        """Remove an artifact; one already gone (or not removable) is left as it is."""
        with contextlib.suppress(ArtifactNotFound, OSError, ValueError):
            self.store.remove(artifact_id)

    def remove_all(self, prefix: str) -> None:
        """Remove every artifact named `<prefix>...`: a trial's and its retries' checkpoints,
        including one a worker killed between saving a new checkpoint and removing the old left."""
        for path in self.where.glob(f"{prefix}*.pt"):
            self.remove(path.name)

    def put_bytes(self, data: bytes, name: str) -> str:
        """Store `data` as the artifact `name` (a failed write leaves nothing); its id."""
        try:
            self.store.write(name, io.BytesIO(data))
        except BaseException:
            self.remove(name)
            raise
        return name

    def get_bytes(self, artifact_id: str, source: str) -> bytes:
        """The bytes of `artifact_id`. CheckpointError: gone or unreadable (one line)."""
        try:
            with self.store.open_reader(artifact_id) as reader:
                return reader.read()
        except ArtifactNotFound:
            raise CheckpointError(f"{source} ({artifact_id}) is not in the artifact directory {self.where}") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{source} ({artifact_id}): cannot read it ({exc})") from None

    def usage(self, prefix: str = "") -> tuple[int, int]:
        """(artifacts, bytes) of the artifacts whose id starts with `prefix`."""
        sizes = [p.stat().st_size for p in self.where.glob(f"{prefix}*") if p.is_file()]
        return len(sizes), sum(sizes)

    @property
    def shown(self) -> str:
        return str(self.where)


def artifact_store_if_any(url: str, given: str | os.PathLike | None = None) -> CheckpointStore | None:
    """The artifact store of `url` for a command that only reads it (status, export --model):
    None when off or when its directory does not exist (nothing is created)."""
    where = artifact_dir(url, given)
    return CheckpointStore(where) if where is not None and where.is_dir() else None


def open_artifacts(url: str, given: str | os.PathLike | None = None) -> CheckpointStore | None:
    """The checkpoint store of a command on the storage at `url` (see `artifact_dir`), or None."""
    where = artifact_dir(url, given)
    return None if where is None else CheckpointStore(where)


class TrialCheckpoint:
    """One trial's latest checkpoint; with no store (checkpoints off) every method does nothing.

    `current` starts as the trial's stored `checkpoint` attr: for a retry, the original's last
    checkpoint, which `saved_run` loads, and which the retry's first own save (or its end) removes.
    """

    def __init__(self, trial: optuna.Trial, store: CheckpointStore | None, user_attrs: dict,
                 first: int | None = None):
        self.trial, self.store = trial, store
        # The files of a trial and of its retries share a name prefix: the study and the number
        # of the first trial of the line (`first`, from retry_history), so its end removes them all.
        self.prefix = f"{trial.study.study_name}-trial{trial.number if first is None else first}-"
        self.current = user_attrs.get(CHECKPOINT_ATTR) if store is not None else None
        self.state = None  # the TrainState that `save` saves
        self._warned = False

    def saved_run(self, retry_history: list[int]) -> dict | None:
        """For a retry, the original trial's last checkpoint document; None when this is no retry,
        it left none, or it cannot be read (then `resume_error` says why, one line)."""
        if self.store is None or not retry_history or not self.current:
            return None
        try:
            return self.store.load(self.current, f"trial {retry_history[-1]}'s checkpoint")
        except CheckpointError as exc:
            self.failed(exc)
            return None

    def failed(self, exc: BaseException) -> None:
        """The saved run cannot be resumed: say so on the trial; it trains from scratch."""
        self.trial.set_user_attr("resume_error", f"{first_line(exc, with_type=True)}; trained from scratch")

    def save(self) -> None:
        """Save `state` as the trial's checkpoint, then remove the previous one. A checkpoint that
        cannot be written is one `checkpoint_error` attr, and training goes on without it."""
        if self.store is None or self.state is None:
            return
        try:
            new = self.store.save(self.state, {"trial": self.trial.number}, self.prefix)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                self.trial.set_user_attr("checkpoint_error", f"not saved in {self.store.where}: {first_line(exc, with_type=True)}")
            return
        try:
            self.trial.set_user_attr(CHECKPOINT_ATTR, new)
        except BaseException:
            self.store.remove(new)  # not recorded: nobody would ever find it
            raise
        old, self.current = self.current, new
        if old:
            self.store.remove(old)

    def drop(self) -> None:
        """The trial is over and will not be retried: remove its checkpoints (and any its line of
        retries left behind)."""
        if self.store is not None:
            if self.current:
                self.store.remove(self.current)
            self.store.remove_all(self.prefix)
            self.current = None
