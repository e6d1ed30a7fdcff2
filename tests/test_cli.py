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
