"""Trial checkpoints in an Optuna artifact store: where it is, and one trial's latest checkpoint.

Where (`artifact_dir`, first found): the command's `--artifacts PATH|URL`, `$CNNSEARCH_ARTIFACTS`,
else for a SQLite database the directory `<db stem>-artifacts/` beside its file; for any other
storage (PostgreSQL) none, and trials keep no checkpoints. `none` (or `off`) turns them off.
A directory is an `optuna.artifacts.FileSystemArtifactStore`, local or shared (NFS): a retry
resumes from a checkpoint only where its worker sees the directory the dead worker wrote to;
elsewhere it trains from scratch with a `resume_error`. An `s3://bucket/prefix` URL is an
`optuna.artifacts.Boto3ArtifactStore` on that bucket (AWS S3, MinIO, any S3-compatible store),
every artifact id under the prefix; the endpoint and credentials are boto3's own configuration
(AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, ~/.aws), and boto3 is imported only for such a URL (`pip install boto3`, or
the `s3` extra). Other URLs (gs://, http://) are refused in one line. Commands that write
checkpoints (`create`, `run`, `worker`) open the store with `probe=True`: a store that cannot be
written is one line before the first trial, not a `checkpoint_error` on every trial.

Both stores are a `CheckpointStore` (the directory one; `S3CheckpointStore` for a bucket), which
holds any file, not only checkpoints: `put_bytes`/`get_bytes`, `remove`, `remove_all(prefix)`,
`usage(prefix)` (count and bytes, for `status`), `probe`; `shown` is the store as the user named it.
Ids whose last part starts with a dot are the store's own (a write in progress, a probe) and are
neither listed nor counted.

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
import glob
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from sqlalchemy.engine import make_url

from search.errors import CheckpointError, CnnsearchError, first_line
from search.urls import sqlite_path

ARTIFACTS_ENV = "CNNSEARCH_ARTIFACTS"
CHECKPOINT_ATTR = "checkpoint"  # trial user attr: the artifact id of the trial's latest checkpoint
OFF = ("none", "off")
PROBE_PREFIX = ".cnnsearch-probe-"  # `probe`'s artifact: a dot name, never listed
# The probe's S3 client: an endpoint that does not answer is one line in seconds, not minutes of
# boto3's default retries (5 attempts, 60 s connect timeout each).
PROBE_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 2, "mode": "standard"}}


def artifact_dir(url: str, given: str | os.PathLike | None = None) -> Path | str | None:
    """Where trial checkpoints go for the storage at `url`: `given`, else $CNNSEARCH_ARTIFACTS,
    else `<db stem>-artifacts` beside a SQLite file; None when off or there is no default
    (PostgreSQL, an in-memory SQLite). A directory is an absolute Path; an S3 store its
    `s3://bucket[/prefix]` URL (a str, without a trailing slash).

    Raises:
        CnnsearchError: a URL of another scheme (gs://, http://...), or an s3:// URL without a bucket.
    """
    if given is None:
        given = os.environ.get(ARTIFACTS_ENV) or None
    if given is not None:
        text = str(given).strip()
        if text.lower() in OFF:
            return None
        if "://" in text:
            return _s3_url(text)
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


def _s3_url(text: str) -> str:
    """`s3://bucket[/prefix]` normalised (no trailing slash); any other URL is one line."""
    parts = urlsplit(text)
    if parts.scheme.lower() != "s3":
        raise CnnsearchError(f"--artifacts {text!r}: only a directory (local or shared) or an "
                             "s3://bucket/prefix URL (AWS S3, MinIO, any S3-compatible store) is supported "
                             "for trial checkpoints")
    if not parts.netloc:
        raise CnnsearchError(f"--artifacts {text!r}: no bucket; expected s3://bucket or s3://bucket/prefix")
    prefix = parts.path.strip("/")
    return f"s3://{parts.netloc}/{prefix}" if prefix else f"s3://{parts.netloc}"


def _hidden(artifact_id: str) -> bool:
    """An id of the store's own (a write in progress, a probe): its last part starts with a dot."""
    return artifact_id.rpartition("/")[2].startswith(".")


class CheckpointStore:
    """Trial checkpoints, and any other file, as artifacts of one Optuna artifact store.

    This class keeps them in a directory (`where`, a Path), as `FileSystemArtifactStore` lays them
    out: the artifact `id` is the file `where/id`. `S3CheckpointStore` is the same over a bucket;
    the two differ only in how they write, list and probe (the methods starting with `_`).
    `shown` is the store as the user named it (a path, an s3:// URL), for messages; `kind` says
    what it is in them.
    """

    kind = "artifact directory"

    def __init__(self, where: Path):
        self.where = Path(where)
        try:
            self.where.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CnnsearchError(f"artifact directory {self.where}: cannot create it "
                                 f"({exc.strerror or exc})") from None
        self.store = FileSystemArtifactStore(self.where)
        self.errors: tuple[type[BaseException], ...] = (OSError,)  # what the store raises when it fails

    @property
    def shown(self) -> str:
        """The store as the user named it: its directory, or its s3:// URL."""
        return str(self.where)

    # --- what the two stores do differently -------------------------------------------------

    def _key(self, artifact_id: str) -> str:
        """The Optuna store's id for `artifact_id` (S3: under the URL's prefix)."""
        return artifact_id

    def _write(self, artifact_id: str, data: bytes) -> None:
        """Write through a temporary dot-sibling and rename: the file is whole or absent."""
        if Path(artifact_id).is_absolute() or ".." in Path(artifact_id).parts:
            raise ValueError(f"invalid artifact id {artifact_id!r}: not a relative path inside the store")
        path = self.where / artifact_id
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # gone already after the rename

    def _listing(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(id, size in bytes) of every artifact whose id starts with `prefix`."""
        for folder, _, names in os.walk(self.where):
            for name in names:
                path = Path(folder, name)
                artifact_id = path.relative_to(self.where).as_posix()
                if artifact_id.startswith(prefix) and not _hidden(artifact_id):
                    with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                        yield artifact_id, path.stat().st_size

    def _check_write(self, artifact_id: str) -> None:
        """Write and remove a tiny artifact, raising what the store raises."""
        self._write(artifact_id, b"cnnsearch probe")
        self.store.remove(self._key(artifact_id))

    def _remove_partial(self, prefix: str) -> None:
        """Remove what writes killed midway left of artifacts named `<prefix>...` (dot-siblings)."""
        head, _, tail = prefix.rpartition("/")
        for path in (self.where / head).glob(f".{glob.escape(tail)}*.part"):
            with contextlib.suppress(OSError):
                path.unlink()

    # --- the same for both ------------------------------------------------------------------

    def put_bytes(self, data: bytes, name: str) -> str:
        """Store `data` as a new artifact whose id is `name`, replacing one of that id; the id.

        `name` is a relative path (`/` makes folders, or key parts on S3) whose last part does not
        start with a dot. The id is valid once this returns; a failed write leaves nothing
        under it (a directory writes a temporary sibling and renames it; an S3 PUT is whole).

        Raises:
            OSError: not written (an S3 error comes as an OSError that names it).
            ValueError: `name` is not a valid artifact id.
        """
        if not name or _hidden(name):
            raise ValueError(f"invalid artifact id {name!r}: empty, or its last part starts with a dot")
        try:
            self._write(name, data)
        except OSError:
            raise
        except self.errors as exc:
            raise OSError(f"{self.shown}: cannot write {name} ({first_line(exc, with_type=True)})") from exc
        return name

    def get_bytes(self, artifact_id: str, source: str) -> bytes:
        """The content of the artifact `artifact_id`; `source` names it in the error.

        Raises:
            CheckpointError: not in the store, or unreadable (one line).
        """
        try:
            with contextlib.closing(self.store.open_reader(self._key(artifact_id))) as reader:
                return reader.read()
        except ArtifactNotFound:
            raise CheckpointError(f"{source} ({artifact_id}) is not in the {self.kind} {self.shown}") from None
        except (ValueError, *self.errors) as exc:
            raise CheckpointError(f"{source} ({artifact_id}): cannot read it ({first_line(exc)})") from None

    def save(self, state, extra: dict | None = None, prefix: str = "") -> str:
        """Write the checkpoint of `state` as a new artifact named `<prefix><uuid>.pt`; its id.
        OSError: not written (and nothing left under that id)."""
        from search import checkpoints  # torch: only for a command that trains

        return self.put_bytes(checkpoints.state_bytes(state, extra), f"{prefix}{uuid.uuid4()}.pt")

    def load(self, artifact_id: str, source: str) -> dict:
        """The checkpoint document (`checkpoints.state_from_bytes`) stored as `artifact_id`.

        Raises:
            CheckpointError: gone from the store, unreadable, or not a checkpoint (one line).
        """
        from search import checkpoints

        return checkpoints.state_from_bytes(self.get_bytes(artifact_id, source), source)

    def remove(self, artifact_id: str) -> None:
        """Remove an artifact; one already gone (or not removable) is left as it is."""
        with contextlib.suppress(ArtifactNotFound, ValueError, *self.errors):
            self.store.remove(self._key(artifact_id))

    def remove_all(self, prefix: str) -> None:
        """Remove every artifact whose id starts with `prefix`: a trial's and its retries'
        checkpoints, including one a worker killed between saving a new checkpoint and removing
        the old left (and a write it was killed in). A store that cannot be listed is left as it is."""
        with contextlib.suppress(*self.errors):
            for artifact_id in [artifact_id for artifact_id, _ in self._listing(prefix)]:
                self.remove(artifact_id)
            self._remove_partial(prefix)

    def usage(self, prefix: str = "") -> tuple[int, int]:
        """(number of artifacts, their total size in bytes) whose id starts with `prefix`.

        Raises:
            CnnsearchError: the store cannot be listed (one line).
        """
        count = size = 0
        try:
            for _, n in self._listing(prefix):
                count, size = count + 1, size + n
        except self.errors as exc:
            raise CnnsearchError(f"{self.kind} {self.shown}: cannot list it ({first_line(exc)})") from None
        return count, size

    def probe(self) -> None:
        """Write a tiny artifact and remove it: the store can take checkpoints.

        Raises:
            CnnsearchError: it cannot (a read-only directory, a missing bucket, bad credentials,
                an endpoint that does not answer), in one line naming the store.
        """
        try:
            self._check_write(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        except self.errors as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
            raise CnnsearchError(f"{self.kind} {self.shown}: cannot write ({why})") from None


class S3CheckpointStore(CheckpointStore):
    """A `CheckpointStore` in an S3 bucket (AWS S3, MinIO, ...) through Optuna's
    `Boto3ArtifactStore`: `where` is its `s3://bucket[/prefix]` URL, and the artifact `id` is the
    object `prefix/id`. boto3 finds the endpoint and credentials where it always looks (the
    environment, ~/.aws). Creating one contacts nothing; `probe` does."""

    kind = "artifact store"

    def __init__(self, where: str):
        self.where = _s3_url(where)
        try:
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise CnnsearchError(f"artifact store {self.where}: needs boto3, which is not installed "
                                 "(pip install boto3)") from None
        parts = urlsplit(self.where)
        self.bucket, prefix = parts.netloc, parts.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        try:
            self.client = boto3.client("s3")
        except (BotoCoreError, ValueError) as exc:  # a malformed endpoint URL or ~/.aws file
            raise CnnsearchError(f"artifact store {self.where}: {first_line(exc)}") from None
        self.store = Boto3ArtifactStore(self.bucket, client=self.client, avoid_buf_copy=True)
        self.errors = (OSError, BotoCoreError, ClientError)

    @property
    def shown(self) -> str:
        return self.where

    def _key(self, artifact_id: str) -> str:
        return f"{self.prefix}{artifact_id}"

    def _write(self, artifact_id: str, data: bytes) -> None:
        self.store.write(self._key(artifact_id), io.BytesIO(data))  # one PUT (or multipart): whole or absent

    def _listing(self, prefix: str) -> Iterator[tuple[str, int]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        for page in pages:
            for obj in page.get("Contents", []):
                artifact_id = obj["Key"][len(self.prefix):]
                if not _hidden(artifact_id):
                    yield artifact_id, obj["Size"]

    def _check_write(self, artifact_id: str) -> None:
        import boto3
        from botocore.config import Config

        quick = boto3.client("s3", config=Config(**PROBE_S3_CONFIG))
        quick.put_object(Bucket=self.bucket, Key=self._key(artifact_id), Body=b"cnnsearch probe")
        quick.delete_object(Bucket=self.bucket, Key=self._key(artifact_id))

    def _remove_partial(self, prefix: str) -> None:
        pass  # a PUT leaves no partial object


def checkpoint_store(where: Path | str) -> CheckpointStore:
    """The store at `where` (`artifact_dir`'s answer): a directory (created), or an s3:// URL."""
    return S3CheckpointStore(where) if isinstance(where, str) else CheckpointStore(where)


def artifact_store_if_any(url: str, given: str | os.PathLike | None = None) -> CheckpointStore | None:
    """The artifact store of `url` for a command that only reads it (status, export --model):
    None when off or when its directory does not exist (nothing is created; an S3 store is
    returned as it is, unprobed)."""
    where = artifact_dir(url, given)
    if where is None or (isinstance(where, Path) and not where.is_dir()):
        return None
    return checkpoint_store(where)


def open_artifacts(url: str, given: str | os.PathLike | None = None, probe: bool = False) -> CheckpointStore | None:
    """The checkpoint store of a command on the storage at `url` (see `artifact_dir`), or None.
    `probe`: check now that it can be written (`CheckpointStore.probe`; a one-line CnnsearchError)."""
    where = artifact_dir(url, given)
    if where is None:
        return None
    store = checkpoint_store(where)
    if probe:
        store.probe()
    return store


def trial_prefix(study_name: str, first: int) -> str:
    """The name prefix of the checkpoints of a trial and its retries (`first`: the line's first trial)."""
    return f"{study_name}-trial{first}-"


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
        self.prefix = trial_prefix(trial.study.study_name, trial.number if first is None else first)
        self.current = user_attrs.get(CHECKPOINT_ATTR) if store is not None else None
        self.state = None  # the TrainState that `save` saves
        self.kept = False  # `keep`: the last checkpoint outlives the trial
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

    def start(self, cfg, ds, device, retry_history: list[int]):
        """The run's `TrainState`, kept as `state` for `save`: for a retry, resumed from the
        original's last checkpoint (one that cannot be loaded: `resume_error`, and from scratch),
        recorded as the user attr `resumed_from_epoch`; else a fresh one."""
        from search import engine  # torch: only for a command that trains

        state = engine.TrainState.start(cfg, ds, device)
        saved = self.saved_run(retry_history)
        if saved is not None:
            try:
                state.load_state_dict(saved["state"])
            except Exception as exc:  # noqa: BLE001 - CheckpointError (another run's), or malformed
                self.failed(exc)
                state = engine.TrainState.start(cfg, ds, device)  # the load may have half-applied
        if retry_history and self.store is not None:
            self.trial.set_user_attr("resumed_from_epoch", state.epoch)
        self.state = state
        return state

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

    def keep(self) -> None:
        """The trial's last checkpoint outlives it (a final-stage finalist carries the run on,
        search/finalstage.py, which removes it): `drop` leaves it."""
        self.kept = True

    def drop(self) -> None:
        """The trial is over and will not be retried: remove its checkpoints (and any its line of
        retries left behind), but a kept last one."""
        if self.store is not None and not self.kept:
            if self.current:
                self.store.remove(self.current)
            self.store.remove_all(self.prefix)
            self.current = None
