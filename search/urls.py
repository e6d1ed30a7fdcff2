"""Where the storage is, and how to speak of it: URLs, the storage file, masked passwords,
connection problems and the reconnect wait. No Optuna here (see search/storage.py)."""

from __future__ import annotations

import os
import stat
import time

import sqlalchemy
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from search.errors import StorageError

DEFAULT_URL = "sqlite:///cnnsearch.db"
STORAGE_FILE_ENV = "CNNSEARCH_STORAGE_FILE"  # a file (mode 0600) holding the URL, password and all
NO_STORAGE_HINT = "run cnnsearch create or run first, or pass --storage URL"


def storage_url(url: str | None = None) -> str:
    """`--storage` -> $CNNSEARCH_STORAGE -> the file named by $CNNSEARCH_STORAGE_FILE -> a SQLite
    file in the working directory. (The CLI's --storage reads $CNNSEARCH_STORAGE itself.)

    Raises:
        StorageError: the storage file is missing, empty, or readable by group or others.
    """
    if url or os.environ.get("CNNSEARCH_STORAGE"):
        return url or os.environ["CNNSEARCH_STORAGE"]
    path = os.environ.get(STORAGE_FILE_ENV)
    return read_storage_file(path) if path else DEFAULT_URL


def read_storage_file(path: str) -> str:
    """The URL in `path`: one line (blank lines and # comments aside), in a file only its owner
    can read or write, since the URL may hold a password. The contents never appear in an error."""
    where = f"{STORAGE_FILE_ENV}={path}"
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"{where}: not a regular file")
        if info.st_mode & 0o077:
            raise StorageError(f"{where}: the file is open to group or others (mode "
                               f"{stat.S_IMODE(info.st_mode):04o}) and may hold a password; chmod 600 {path}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise StorageError(f"{where}: cannot read it ({exc.strerror or exc.__class__.__name__})") from None
    except UnicodeDecodeError:
        raise StorageError(f"{where}: not a text file") from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(lines) != 1:
        raise StorageError(f"{where}: expected one line with the storage URL, found {len(lines)}")
    return lines[0]

def mask_url(url: str) -> str:
    """The URL with its password replaced by ***; unparsable URLs are not echoed whole."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@")[-1] if "@" in url else url

def mask_text(text: str, url: str) -> str:
    """`text` (a driver's error message, say) with the password of `url` replaced by ***."""
    try:
        password = make_url(url).password
    except sqlalchemy.exc.ArgumentError:
        return text
    return text.replace(password, "***") if password else text

def sqlite_path(parsed) -> str | None:
    """The file a SQLite URL names, as an absolute path; None for an in-memory database."""
    database = parsed.database or ""
    if str(parsed.query.get("uri", "")).lower() in ("true", "1") and database.startswith("file:"):
        if parsed.query.get("mode") == "memory":
            return None
        database = database[len("file:"):].split("?", 1)[0]
        database = database[2:] if database.startswith("//") else database  # file:///abs/path
    if database in ("", ":memory:"):
        return None
    return os.path.abspath(database)

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
