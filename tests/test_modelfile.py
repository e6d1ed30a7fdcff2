"""model.pt: written by final training, read safely by `cnnsearch predict`; model.onnx."""

import json
import pickle

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from search import config, datasets
from search.cli import app
from search.errors import CheckpointError
from search.final import train_final
from search.modelfile import load_model_file

from studykit import assert_one_line_error  # noqa: E402

runner = CliRunner()
# What an export of studykit's quick study holds: 8x8 synthetic images in 3 classes, a tiny convnet.
CONFIG = {"dataset": "synthetic", "data_options": {"n": 400, "classes": 3, "size": 8, "channels": 1},
          "model": "convnet", "model_params": {"channels": [4], "padding": 1, "fc": [8]},
          "optimizer": "adam", "lr": 1e-2, "epochs": 1, "batch_size": 32, "device": "cpu", "warmup_epochs": 5}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("modelfile") / "run"
    train_final(config.from_dict(CONFIG), run_dir)
    return run_dir


def test_predict_classifies_pngs_as_the_dataset_would(trained, tmp_path):
    run_dir = trained
    loaded = load_model_file(run_dir)
    ds = datasets.dataset_for(loaded.config)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(ds.test_x[i, 0].numpy()).save(paths[-1])
    result = invoke("predict", run_dir, *paths)
    assert result.exit_code == 0, result.output
    from search.augment import Normalizer

    with torch.no_grad():  # the same images straight from the dataset tensors
        expected = loaded.model(Normalizer(loaded.mean, loaded.std, torch.device("cpu"))(ds.test_x[:4])).argmax(1)
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


def test_predict_rejects_foreign_model_files_and_images_in_one_line(trained, tmp_path):
    run_dir = trained
    image = tmp_path / "ok.png"
    Image.new("L", (8, 8)).save(image)
    for name, fragment in _foreign_files(tmp_path).items():
        assert_one_line_error(invoke("predict", tmp_path / name, image), fragment)
    raw = torch.load(run_dir / "model.pt", weights_only=True)
    raw["state_dict"] = {k: v[..., :1] for k, v in raw["state_dict"].items()}  # shapes of another model
    torch.save(raw, tmp_path / "mismatch.pt")
    assert_one_line_error(invoke("predict", tmp_path / "mismatch.pt", image), "does not match its model")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert_one_line_error(invoke("predict", run_dir, tmp_path / "broken.png"), "cannot read image")
    assert_one_line_error(invoke("predict", run_dir), "give image files")
    with pytest.raises(CheckpointError):
        load_model_file(tmp_path / "missing.pt")


def test_onnx_export_matches_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnx/onnxruntime not installed (optional extra)")
    pytest.importorskip("onnx")
    train_final(config.from_dict(CONFIG), tmp_path / "onnx", onnx=True)
    loaded = load_model_file(tmp_path / "onnx")
    x = torch.randn(5, *loaded.in_shape)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), loaded.model(x), atol=1e-4)


def test_a_tta_flip_model_predicts_and_exports_as_it_was_tested(tmp_path):
    cfg = config.from_dict({**CONFIG, "tta_flip": True})
    train_final(cfg, tmp_path / "tta")
    loaded = load_model_file(tmp_path / "tta")
    assert loaded.config.tta_flip
    ds = datasets.dataset_for(loaded.config)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(ds.test_x[i, 0].numpy()).save(paths[-1])
    from search.augment import Normalizer
    from search.modelfile import predict_images

    with torch.no_grad():
        x = Normalizer(loaded.mean, loaded.std, torch.device("cpu"))(ds.test_x[:3])
        probs = torch.softmax((loaded.model(x) + loaded.model(x.flip(3))) / 2, dim=1)
    got = predict_images(loaded, paths)
    assert [p.index for p in got] == probs.argmax(1).tolist()
    assert [p.probability for p in got] == pytest.approx(probs.max(1).values.tolist(), rel=1e-5)
    test_acc = json.loads((tmp_path / "tta" / "metrics.json").read_text())["runs"][0]["test_acc"]
    result = invoke("predict", tmp_path / "tta", "--dataset-test")
    assert result.exit_code == 0, result.output
    assert f"accuracy {test_acc:.2%}" in result.stdout


def test_onnx_export_of_a_tta_flip_model_averages_the_mirror_image(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnx/onnxruntime not installed (optional extra)")
    pytest.importorskip("onnx")
    train_final(config.from_dict({**CONFIG, "tta_flip": True}), tmp_path / "onnx", onnx=True)
    loaded = load_model_file(tmp_path / "onnx")
    x = torch.randn(5, *loaded.in_shape)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = (loaded.model(x) + loaded.model(x.flip(3))) / 2
    assert torch.allclose(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), expected, atol=1e-4)
