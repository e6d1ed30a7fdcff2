"""export -> train -> predict, through the CLI, on a tiny study run by the real worker."""

import json
import pickle
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from search import config, data, space
from search import spec as spec_mod
from search import study as study_mod
from search.cli import app
from search.export import CheckpointError, export_document, load_checkpoint, write_atomic

from studykit import QUICK_STUDY, assert_one_line_error, quick_study  # noqa: E402

runner = CliRunner()

def make_study(folder, n_trials=2, run=True):
    return quick_study(folder, "tiny", n_trials=n_trials, run=run)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    return folder, make_study(folder)


@pytest.fixture(scope="module")
def exported(workdir):
    folder, url = workdir
    result = invoke("export", "tiny", "-o", folder / "best.json", "--storage", url)
    assert result.exit_code == 0, result.output
    return folder / "best.json"


@pytest.fixture(scope="module")
def trained(workdir, exported):
    folder, _ = workdir
    result = invoke("train", exported, "--epochs", 1, "--out", folder / "run")
    assert result.exit_code == 0, result.output
    return folder / "run", result.stdout


def test_export_is_the_best_trials_config_with_provenance(workdir, exported):
    folder, url = workdir
    doc = json.loads(exported.read_text())
    study, spec, best = study_mod.best_trial("tiny", url)
    assert config.load(exported) == space.params_to_config(spec, best.params)  # what train will run
    prov = doc["provenance"]
    assert (prov["study"], prov["trial"], prov["value"], prov["params"]) == ("tiny", best.number, best.value, best.params)
    assert prov["data"] == {"dataset": "synthetic", "data_options": {"n": 400, "classes": 3, "size": 8, "channels": 1},
                            "val_fraction": 0.1, "val_seed": 0, "subset": None}
    assert set(prov["versions"]) == {"cnnsearch", "torch", "torchvision", "optuna"} and prov["versions"]["torch"]
    assert prov["storage"] == url and prov["exported_at"]


def test_export_masks_the_storage_password(workdir):
    _, url = workdir
    study, spec, best = study_mod.best_trial("tiny", url)
    doc = export_document(study, spec, best, "postgresql+psycopg://search:hunter2@db.example/cnnsearch")
    text = json.dumps(doc)
    assert "hunter2" not in text and "search:***@db.example" in text


def test_export_without_a_finished_trial_is_one_line(tmp_path):
    url = make_study(tmp_path, run=False)
    assert_one_line_error(invoke("export", "tiny", "-o", tmp_path / "best.json", "--storage", url),
                          "has no finished trial")
    assert not (tmp_path / "best.json").exists()
    assert_one_line_error(invoke("export", "nope", "--storage", url), "no study named 'nope'")


def test_a_failed_write_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "best.json"
    target.write_text("old")

    def half_then_fail(f):
        f.write(b"{\"config\": ")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["best.json"]


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


def test_export_rank_takes_the_next_best_completed_trial(workdir):
    folder, url = workdir
    first, second = folder / "rank1.json", folder / "rank2.json"
    for rank, path in ((1, first), (2, second)):
        result = invoke("export", "tiny", "--rank", rank, "-o", path, "--storage", url)
        assert result.exit_code == 0, result.output
    one, two = (json.loads(p.read_text())["provenance"] for p in (first, second))
    assert one["trial"] == study_mod.best_trial("tiny", url)[2].number and one["trial"] != two["trial"]
    assert one["value"] >= two["value"]
    assert_one_line_error(invoke("export", "tiny", "--rank", 3, "-o", folder / "r3.json", "--storage", url),
                          "has 2 completed trials")
    assert_one_line_error(invoke("export", "tiny", "--rank", 2, "--trial", 0, "--storage", url),
                          "--trial or --rank")
    assert not (folder / "r3.json").exists()


def test_no_test_trains_without_reading_the_test_split(workdir, exported, monkeypatch):
    from search import engine

    folder, _ = workdir
    sizes = []
    real = engine.evaluate

    def counting(model, x, y, *args, **kwargs):
        sizes.append(len(y))
        return real(model, x, y, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", counting)
    ds = data.dataset_for(config.load(exported))
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


def test_predict_classifies_pngs_as_the_dataset_would(trained, tmp_path):
    run_dir, _ = trained
    ckpt = load_checkpoint(run_dir)
    ds = data.dataset_for(ckpt.config)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(ds.test_x[i, 0].numpy()).save(paths[-1])
    result = invoke("predict", run_dir, *paths)
    assert result.exit_code == 0, result.output
    from search.engine import Normalizer

    with torch.no_grad():  # the same images straight from the dataset tensors
        expected = ckpt.model(Normalizer(ckpt.mean, ckpt.std, torch.device("cpu"))(ds.test_x[:4])).argmax(1)
    lines = result.stdout.splitlines()
    for path, line, k in zip(paths, lines, expected.tolist()):
        assert line.startswith(f"{path}: class_{k} (class {k}, p=0."), line

    test_acc = json.loads((run_dir / "metrics.json").read_text())["runs"][0]["test_acc"]
    result = invoke("predict", run_dir, "--dataset-test")
    assert result.exit_code == 0, result.output
    assert f"accuracy {test_acc:.2%}" in result.stdout  # the same number final training reported


def _foreign_files(folder):
    (folder / "random.pt").write_bytes(bytes(range(256)) * 8)
    (folder / "object.pt").write_bytes(pickle.dumps(Image.new("L", (2, 2))))  # arbitrary pickled object
    torch.save({"weight": torch.zeros(3)}, folder / "state_dict.pt")
    return {"random.pt": "cannot be loaded safely", "object.pt": "cannot be loaded safely",
            "state_dict.pt": "expected a model.pt written by cnnsearch train"}


def test_predict_rejects_foreign_checkpoints_and_images_in_one_line(trained, tmp_path):
    run_dir, _ = trained
    image = tmp_path / "ok.png"
    Image.new("L", (8, 8)).save(image)
    for name, fragment in _foreign_files(tmp_path).items():
        assert_one_line_error(invoke("predict", tmp_path / name, image), fragment)
    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    ckpt["state_dict"] = {k: v[..., :1] for k, v in ckpt["state_dict"].items()}  # shapes of another model
    torch.save(ckpt, tmp_path / "mismatch.pt")
    assert_one_line_error(invoke("predict", tmp_path / "mismatch.pt", image), "does not match its model")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert_one_line_error(invoke("predict", run_dir, tmp_path / "broken.png"), "cannot read image")
    assert_one_line_error(invoke("predict", run_dir), "give image files")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing.pt")


def test_onnx_export_matches_pytorch(workdir, exported, trained):
    ort = pytest.importorskip("onnxruntime", reason="onnx/onnxruntime not installed (optional extra)")
    pytest.importorskip("onnx")
    folder, _ = workdir
    result = invoke("train", exported, "--epochs", 1, "--onnx", "--out", folder / "onnx")
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(folder / "onnx")
    x = torch.randn(5, *ckpt.in_shape)
    session = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), ckpt.model(x), atol=1e-4)


def test_onnx_without_the_package_is_one_line(exported, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert_one_line_error(invoke("train", exported, "--onnx", "--out", tmp_path / "x"), "needs the onnx")
    assert not (tmp_path / "x").exists()


def test_export_of_a_folder_study_names_its_classes(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), color=40 * i).save(tmp_path / "pets" / name / f"{i}.png")
    text = QUICK_STUDY.format(name="tiny", n_trials=1, n=400, description="a folder study").replace('dataset = "synthetic"', 'dataset = "folder"').replace(
        "data_options = { n = 400, classes = 3, size = 8, channels = 1 }",
        f'data_options = {{ path = "{tmp_path / "pets"}", image_size = 8, channels = 1 }}')
    (tmp_path / "pets.toml").write_text(text)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = spec_mod.load_spec(tmp_path / "pets.toml")
    study = study_mod.create(spec, url).study

    def no_training(trial):  # a finished trial is all the export needs
        space.suggest_params(trial, spec)
        return 0.5

    study.optimize(no_training, n_trials=1)
    result = invoke("export", "tiny", "-o", tmp_path / "best.json", "--storage", url)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "best.json").read_text())["provenance"]["classes"] == ["cat", "dog"]
