import pytest
from typer.testing import CliRunner

import search
from search.cli import app

from studykit import assert_one_line_error  # noqa: E402

runner = CliRunner()


def run(*args, **kwargs):
    return runner.invoke(app, list(args), **kwargs)


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and search.__version__ in result.stdout


def test_train_digits_prints_progress_and_accuracies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # train writes runs/<name>/ here
    result = run("train", "--set", "dataset=digits", "--set", "epochs=2", "--set", "batch_size=32",
                 "--set", 'model_params={"channels": [8, 16], "padding": 1, "fc": [32]}', "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "epoch   1/2" in result.stdout and "epoch   2/2" in result.stdout
    assert "test acc" in result.stdout and "best val acc" in result.stdout


def test_train_reads_a_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.toml"
    path.write_text('dataset = "synthetic"\nepochs = 1\nbatch_size = 16\ndevice = "cpu"\n'
                    '[data_options]\nn = 200\nclasses = 3\nsize = 8\nchannels = 1\n'
                    '[model_params]\nchannels = [4]\npadding = 1\nfc = [8]\n')
    result = run("train", str(path))
    assert result.exit_code == 0, result.output
    assert "epoch   1/1" in result.stdout


@pytest.mark.parametrize("args,fragment", [
    (["train", "missing.json"], "missing.json: no such file"),
    (["train", "--set", "learning_rate=0.1"], "unknown key 'learning_rate'"),
    (["train", "--set", "lr=fast"], "lr: expected float"),
    (["train", "--set", "epochs"], "expected key=value"),
    (["train", "--set", "model=resnet9000"], "resnet9000"),
    (["train", "--set", "dataset=imagenet"], "imagenet"),
    (["train", "--set", "dataset=mnist", "--data-dir", "/nonexistent/cnnsearch"], "/nonexistent/cnnsearch"),
    (["train", "--device", "cuda:7"], "cuda"),
])
def test_bad_input_is_one_line_and_exit_1(args, fragment):
    assert_one_line_error(run(*args), fragment)


def test_a_bug_is_a_traceback_with_a_hint_not_a_user_error(tmp_path, monkeypatch):
    """Only the project's own errors are shown as bad input; a KeyError or ValueError from
    inside the code is a bug, and hiding its traceback would hide where it is."""
    from search import study as study_mod

    def broken(*args, **kwargs):
        raise KeyError("cnnsearch_internal_key")

    monkeypatch.setattr(study_mod, "list_studies", broken)
    result = run("list", "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.exit_code == 70, result.output
    assert "Traceback" in result.output and "cnnsearch_internal_key" in result.output
    assert "a bug in cnnsearch, not in your input" in result.output
    assert "error: " not in result.output


def test_a_user_error_raised_anywhere_is_one_line(tmp_path, monkeypatch):
    from search import study as study_mod
    from search.errors import StudyError

    def refused(*args, **kwargs):
        raise StudyError("no study here\nsecond line never shown")

    monkeypatch.setattr(study_mod, "list_studies", refused)
    assert_one_line_error(run("list", "--storage", f"sqlite:///{tmp_path / 'x.db'}"), "no study here")


def test_each_command_opens_its_storage_once(tmp_path, monkeypatch):
    """One Store per command, passed down: a worker used to open the database three times."""
    from search import storage
    from studykit import quick_study

    url = quick_study(tmp_path, "tiny", n_trials=2, run=False)
    opened = []
    real = storage.open_storage
    monkeypatch.setattr(storage, "open_storage", lambda *a, **k: opened.append(a) or real(*a, **k))
    for args in (["worker", "tiny", "--device", "cpu", "-q"], ["status", "tiny"], ["best", "tiny"],
                 ["list"], ["export", "tiny", "-o", str(tmp_path / "best.json")],
                 ["report", "tiny", "-o", str(tmp_path / "r.html")]):
        opened.clear()
        result = run(*args, "--storage", url)
        assert result.exit_code == 0, result.output
        assert len(opened) == 1, f"{args[0]} opened the storage {len(opened)} times"
