"""`cnnsearch train` on an exported file: final training, its metrics.json and curves.png."""

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from search import config, datasets
from search.cli import app
from search.final import default_run_dir

from studykit import assert_one_line_error, export_best, quick_study  # noqa: E402

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("final")
    return folder, quick_study(folder, "tiny", n_trials=2)


@pytest.fixture(scope="module")
def exported(workdir):
    return export_best(*workdir)


@pytest.fixture(scope="module")
def trained(workdir, exported):
    folder, _ = workdir
    result = invoke("train", exported, "--epochs", 1, "--out", folder / "run")
    assert result.exit_code == 0, result.output
    return folder / "run", result.stdout


def test_train_writes_checkpoint_metrics_and_curves(trained):
    run_dir, stdout = trained
    assert "epoch   1/1" in stdout and "test acc" in stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run,) = metrics["runs"]
    assert len(run["history"]) == 1 and 0 <= run["test_acc"] <= 1 and run["best_val_acc"] is not None
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    assert {"state_dict", "config", "classes", "in_shape", "mean", "std"} <= set(ckpt)
    assert ckpt["classes"] == ["class_0", "class_1", "class_2"] and ckpt["in_shape"] == [1, 8, 8]


def test_seeds_report_mean_and_std_and_full_train_drops_validation(workdir, exported):
    folder, _ = workdir
    result = invoke("train", exported, "--epochs", 1, "--seeds", 2, "--full-train", "--out", folder / "seeds")
    assert result.exit_code == 0, result.output
    assert "±" in result.stdout and "over 2 seeds" in result.stdout and "noise" in result.stdout
    metrics = json.loads((folder / "seeds" / "metrics.json").read_text())
    first = json.loads(exported.read_text())["config"]["seed"]
    assert metrics["seeds"] == [first, first + 1] and metrics["full_train"] is True
    assert all(r["best_val_acc"] is None for r in metrics["runs"]) and metrics["test_acc_std"] is not None


def test_no_test_trains_without_reading_the_test_split(workdir, exported, monkeypatch):
    from search import engine

    folder, _ = workdir
    sizes = []
    real = engine.evaluate

    def counting(model, x, y, *args, **kwargs):
        sizes.append(len(y))
        return real(model, x, y, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", counting)
    ds = datasets.dataset_for(config.load(exported))
    result = invoke("train", exported, "--epochs", 2, "--no-test", "--out", folder / "finalist")
    assert result.exit_code == 0, result.output
    assert sizes == [len(ds.val_y)] * 2  # one validation pass an epoch, nothing else
    assert "last-epoch val acc" in result.stdout and "test acc" not in result.stdout
    metrics = json.loads((folder / "finalist" / "metrics.json").read_text())
    (run,) = metrics["runs"]
    assert metrics["tested"] is False and metrics["test_acc_mean"] is None and run["test_acc"] is None
    assert run["final_val_acc"] == run["history"][-1]["val_acc"]
    sizes.clear()
    assert invoke("train", exported, "--epochs", 1, "--out", folder / "tested").exit_code == 0
    assert sizes == [len(ds.val_y), len(ds.test_y)]  # the control: without --no-test the test split is read
    assert_one_line_error(invoke("train", exported, "--no-test", "--full-train", "--out", folder / "none"),
                          "nothing to measure")
    assert not (folder / "none").exists()


def test_onnx_without_the_package_is_one_line(exported, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert_one_line_error(invoke("train", exported, "--onnx", "--out", tmp_path / "x"), "needs the onnx")
    assert not (tmp_path / "x").exists()


def test_default_run_dir_is_named_after_the_config_and_never_an_existing_folder(tmp_path):
    first = default_run_dir("studies/best.json", tmp_path)
    assert first.parent == tmp_path and first.name.startswith("best-")
    first.mkdir()
    second = default_run_dir("studies/best.json", tmp_path)
    assert second != first and not second.exists()


def test_the_noise_line_follows_the_test_set_size_and_model_pt_names_its_seed(workdir, exported):
    """The noise level is computed from this test split, not quoted for MNIST and CIFAR-10; with
    several seeds model.pt is the best on validation, and the output says whose it is."""
    import math

    folder, _ = workdir
    result = invoke("train", exported, "--epochs", 1, "--seeds", 2, "--out", folder / "two")
    assert result.exit_code == 0, result.output
    metrics = json.loads((folder / "two" / "metrics.json").read_text())
    n, p = metrics["test_images"], metrics["test_acc_mean"]
    assert f"on {n:,} test images" in result.stdout and "MNIST" not in result.stdout
    assert f"sampling std of {100 * math.sqrt(p * (1 - p) / n):.2f} points" in result.stdout
    vals = {r["seed"]: r["final_val_acc"] for r in metrics["runs"]}
    best = max(vals, key=lambda s: (vals[s], -s))
    assert metrics["model_seed"] == best and f"model.pt holds seed {best}'s model" in result.stdout
    saved = torch.load(folder / "two" / "model.pt", weights_only=True)
    assert saved["config"]["seed"] == best
