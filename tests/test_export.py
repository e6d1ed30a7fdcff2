"""`cnnsearch export`: the best trial's config as a self-contained file, with its provenance."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from search import config, space
from search import spec as spec_mod
from search import study as study_mod
from search.cli import app
from search.export import export_document

from studykit import QUICK_STUDY, assert_one_line_error, export_best, quick_study  # noqa: E402

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
    return export_best(*workdir)


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


@pytest.mark.parametrize("target", ["folder", "missing/best.json"])
def test_export_to_a_folder_or_a_missing_folder_is_one_line(workdir, target):
    """`-o` naming a directory ended in an IsADirectoryError traceback."""
    folder, url = workdir
    (folder / "folder").mkdir(exist_ok=True)
    result = invoke("export", "tiny", "-o", folder / target, "--storage", url)
    assert_one_line_error(result, "is a directory" if target == "folder" else "does not exist")


def test_export_says_the_search_budget_it_carried_over(workdir):
    folder, url = workdir
    result = invoke("export", "tiny", "-o", folder / "budget.json", "--storage", url)
    assert result.exit_code == 0, result.output
    assert f"carried over from the search: all training images, 2 epochs (cnnsearch train {folder / 'budget.json'} " \
           "alone repeats them)" in result.stdout
    assert f"next, the final model for N epochs: cnnsearch train {folder / 'budget.json'} --epochs N " \
           "--seeds 3" in result.stdout  # no subset: nothing to undo


def test_exports_final_command_trains_a_subset_search_winner_on_every_training_image(tmp_path, monkeypatch):
    """A search on a subset for few epochs, exported, then `train best.json` as the README said,
    trained on the search's subset for the search's epochs without a word. Export now says what
    it carried over, and the command it prints trains on all training images."""
    import shlex

    from search import datasets
    from search.worker import run_worker

    monkeypatch.chdir(tmp_path)
    options = "data_options = { n = 400, classes = 3, size = 8, channels = 1 }"
    text = QUICK_STUDY.format(name="sub", n_trials=1, n=400, description="a search on a subset")
    (tmp_path / "sub.toml").write_text(text.replace(options, f"{options}\nsubset = 90"))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study_mod.create(spec_mod.load_spec(tmp_path / "sub.toml"), url)
    run_worker("sub", url, device="cpu")
    result = invoke("export", "sub", "-o", "best.json", "--storage", url)
    assert result.exit_code == 0, result.output
    assert "carried over from the search: a subset of 90 training images, 2 epochs" in result.stdout
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("next, the final model")]
    command = shlex.split(line.split(": ", 1)[1])
    assert command[:3] == ["cnnsearch", "train", "best.json"] and "N" in command
    trained = invoke(*[("1" if arg == "N" else arg) for arg in command[1:]], "--out", "final")
    assert trained.exit_code == 0, trained.output
    everything = datasets.load_dataset("synthetic", options={"n": 400, "classes": 3, "size": 8, "channels": 1})
    assert f"data: {len(everything.train_y)} training images, " in trained.stdout and "subset" not in trained.stdout
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert metrics["config"]["subset"] is None and metrics["config"]["epochs"] == 1
    assert all(len(r["history"]) == 1 for r in metrics["runs"])
    assert json.loads((tmp_path / "best.json").read_text())["config"]["subset"] == 90  # the trial's, as searched
