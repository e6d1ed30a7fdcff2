"""CNNSEARCH_STORAGE_FILE: the storage URL (password and all) in a file only its owner can read,
for every command that takes --storage (issue 14, class 9). A URL on a command line is shown
by `ps` to every user of the machine; a mode-0600 file is not."""

from __future__ import annotations

import os
import re

import pytest
from typer.testing import CliRunner

from search.cli import app
from search.storage import STORAGE_FILE_ENV, StorageError, storage_url
from studykit import assert_one_line_error, tiny_study

runner = CliRunner()

# Every command with a --storage option, with the arguments it needs to reach its storage.
COMMANDS = {
    "create": lambda study: ["create", str(study)],
    "run": lambda study: ["run", str(study), "--device", "cpu", "--quiet"],
    "worker": lambda study: ["worker", "tiny", "--device", "cpu", "--quiet"],
    "launch": lambda study: ["launch", "tiny", "--cpus", "1"],
    "status": lambda study: ["status", "tiny"],
    "list": lambda study: ["list"],
    "best": lambda study: ["best", "tiny"],
    "delete": lambda study: ["delete", "tiny", "--yes"],
    "export": lambda study: ["export", "tiny", "-o", str(study.parent / "best.json")],
    "report": lambda study: ["report", "tiny", "-o", str(study.parent / "r.html")],
    "dashboard": lambda study: ["dashboard", "--port", "0"],
}


def storage_file(tmp_path, url: str, mode: int = 0o600, text: str | None = None):
    path = tmp_path / "storage-url"
    path.write_text(text if text is not None else f"# the study database\n{url}\n")
    path.chmod(mode)
    return path


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("CNNSEARCH_STORAGE", raising=False)
    monkeypatch.delenv(STORAGE_FILE_ENV, raising=False)
    return monkeypatch


def test_every_command_with_storage_is_listed_here():
    from typer.main import get_command

    group = get_command(app)
    with_storage = {name for name, cmd in group.commands.items() if any(p.name == "storage" for p in cmd.params)}
    assert with_storage == set(COMMANDS)


def test_a_private_file_gives_the_url(tmp_path, clean_env):
    url = f"sqlite:///{tmp_path / 'filed.db'}"
    clean_env.setenv(STORAGE_FILE_ENV, str(storage_file(tmp_path, url)))
    assert storage_url(None) == url
    result = runner.invoke(app, ["create", str(tiny_study(tmp_path))])
    assert result.exit_code == 0 and f"in {url}" in result.stdout, result.output
    assert (tmp_path / "filed.db").exists()
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0 and "tiny" in result.stdout, result.output


def test_the_environment_and_the_option_come_first(tmp_path, clean_env):
    clean_env.setenv(STORAGE_FILE_ENV, str(storage_file(tmp_path, "sqlite:///file.db")))
    assert storage_url("sqlite:///option.db") == "sqlite:///option.db"
    clean_env.setenv("CNNSEARCH_STORAGE", "sqlite:///env.db")
    assert storage_url(None) == "sqlite:///env.db"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_file_open_to_others_is_refused_by_every_command(tmp_path, clean_env, command):
    clean_env.chdir(tmp_path)
    secret = "postgresql+psycopg://cnn:hunter2@127.0.0.1:1/cnn"
    path = storage_file(tmp_path, secret, mode=0o644)
    clean_env.setenv(STORAGE_FILE_ENV, str(path))
    result = runner.invoke(app, COMMANDS[command](tiny_study(tmp_path)))
    assert_one_line_error(result, f"{STORAGE_FILE_ENV}={path}: the file is open to group or others (mode 0644)")
    assert "chmod 600" in result.stderr and "hunter2" not in result.output
    assert not (tmp_path / "cnnsearch.db").exists()  # no fallback to the default SQLite file


@pytest.mark.parametrize("text,mode,fragment", [
    (None, 0o640, "open to group or others (mode 0640)"),
    (None, 0o602, "open to group or others (mode 0602)"),
    ("", 0o600, "expected one line with the storage URL, found 0"),
    ("# only a comment\n\n", 0o600, "found 0"),
    ("sqlite:///a.db\nsqlite:///b.db\n", 0o600, "found 2"),
])
def test_bad_storage_files(tmp_path, clean_env, text, mode, fragment):
    clean_env.setenv(STORAGE_FILE_ENV, str(storage_file(tmp_path, "sqlite:///x.db", mode, text)))
    with pytest.raises(StorageError, match=re.escape(fragment)):
        storage_url(None)


def test_a_missing_file_is_one_line(tmp_path, clean_env):
    clean_env.setenv(STORAGE_FILE_ENV, str(tmp_path / "nope"))
    result = runner.invoke(app, ["list"])
    assert_one_line_error(result, f"{STORAGE_FILE_ENV}={tmp_path / 'nope'}: cannot read it (No such file or directory)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_one_line(tmp_path, clean_env):
    clean_env.setenv(STORAGE_FILE_ENV, str(storage_file(tmp_path, "sqlite:///x.db", mode=0o000)))
    with pytest.raises(StorageError, match="cannot read it"):
        storage_url(None)
