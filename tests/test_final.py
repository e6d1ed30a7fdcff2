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


# --- checkpoints and --resume ------------------------------------------------------------------

class _Stop(KeyboardInterrupt):
    """What Ctrl-C would raise: the on_epoch hook raises it to stop a run after a given epoch."""


def _stop_after(seed_to_stop: int, epochs_done: int):
    def hook(seed, epoch, metrics):
        if seed == seed_to_stop and epoch + 1 == epochs_done:
            raise _Stop()
    return hook


def _resume_cfg(tmp_path):
    cfg = config.RunConfig(dataset="digits", epochs=3, batch_size=64, subset=256, device="cpu", seed=5)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config.to_dict(cfg)))
    return cfg, path


def _weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def _assert_same_result(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    timing = {"seconds", "train_seconds", "samples_per_s"}
    for ra, rb in zip(ma["runs"], mb["runs"], strict=True):
        assert ra["test_acc"] == rb["test_acc"] and ra["seed"] == rb["seed"]
        assert [{k: v for k, v in h.items() if k not in timing} for h in ra["history"]] == \
               [{k: v for k, v in h.items() if k not in timing} for h in rb["history"]]
    assert ma["model_seed"] == mb["model_seed"] and ma["test_acc_mean"] == mb["test_acc_mean"]


def test_train_stopped_after_an_epoch_resumes_to_the_same_weights(tmp_path):
    from search import final

    cfg, path = _resume_cfg(tmp_path)
    assert invoke("train", path, "--out", tmp_path / "ref").exit_code == 0
    assert not (tmp_path / "ref" / "checkpoint.pt").exists()  # removed after success
    with pytest.raises(_Stop):
        final.train_final(cfg, tmp_path / "cut", on_epoch=_stop_after(5, 2))
    assert (tmp_path / "cut" / "checkpoint.pt").exists() and not (tmp_path / "cut" / "model.pt").exists()
    result = invoke("train", "--resume", tmp_path / "cut", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "2 of 3 epochs done" in result.stdout
    assert "epoch   3/3" in result.stdout and "epoch   2/3" not in result.stdout  # one more epoch only
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    _assert_same_result(tmp_path / "ref", tmp_path / "cut")


def test_two_seeds_stopped_in_the_second_keep_the_first_and_skip_it(tmp_path):
    from search import final

    cfg, path = _resume_cfg(tmp_path)
    assert invoke("train", path, "--seeds", 2, "--out", tmp_path / "ref").exit_code == 0
    with pytest.raises(_Stop):
        final.train_final(cfg, tmp_path / "cut", seeds=2, on_epoch=_stop_after(6, 1))
    point = final.resume_point(tmp_path / "cut")
    assert (point.seed, point.epoch, point.seeds) == (6, 1, 2) and [r["seed"] for r in point.saved["runs"]] == [5]
    first = point.saved["runs"][0]
    result = invoke("train", "--resume", tmp_path / "cut")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "seed 5" not in lines and [ln[:11] for ln in lines if ln.startswith("epoch")] == ["epoch   2/3",
                                                                                         "epoch   3/3"]
    metrics = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert metrics["runs"][0] == first  # seed 5's result as it was recorded before the stop
    _assert_same_result(tmp_path / "ref", tmp_path / "cut")


def test_resume_refusals_are_one_line(tmp_path):
    from search import final

    cfg, path = _resume_cfg(tmp_path)
    assert_one_line_error(invoke("train", "--resume", tmp_path), "no checkpoint.pt there")
    with pytest.raises(_Stop):
        final.train_final(cfg, tmp_path / "cut", on_epoch=_stop_after(5, 1))
    assert_one_line_error(invoke("train", "--resume", tmp_path / "cut", "--epochs", 5),
                          "--epochs cannot be given with it")
    assert_one_line_error(invoke("train", path, "--resume", tmp_path / "cut", "--seeds", 2),
                          "CONFIG_FILE, --seeds cannot be given")
    # a fresh run into a folder holding an unfinished one does not overwrite its checkpoint
    assert_one_line_error(invoke("train", path, "--out", tmp_path / "cut"), "train --resume")
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, e.g. by a copy that ran out of disk
    assert_one_line_error(invoke("train", "--resume", tmp_path / "cut"), "not a readable cnnsearch training checkpoint")


def test_checkpoint_every_0_saves_none(tmp_path):
    from search import final

    cfg, _ = _resume_cfg(tmp_path)
    with pytest.raises(_Stop):
        final.train_final(cfg, tmp_path / "cut", checkpoint_every=0, on_epoch=_stop_after(5, 2))
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    with pytest.raises(_Stop):
        final.train_final(cfg, tmp_path / "two", checkpoint_every=2, on_epoch=_stop_after(5, 1))
    assert not (tmp_path / "two" / "checkpoint.pt").exists()
