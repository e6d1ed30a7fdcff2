import optuna
import pytest

from search import spec as spec_mod
from search import study as study_mod
from search.storage import StorageError, mask_url, open_storage, storage_url
from studykit import tiny_study


def test_create_is_idempotent_and_enqueues_once(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    path = tiny_study(tmp_path, enqueue='[[enqueue]]\nlr = 1e-3\noptimizer = "adam"\n')
    spec = spec_mod.load_spec(path)
    assert study_mod.create(spec, url).created
    again = study_mod.create(spec, url)
    assert not again.created
    waiting = again.study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == {"lr": 1e-3, "optimizer": "adam"}


def test_different_spec_under_same_name_is_refused_unless_replaced(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=6)), url)
    other = spec_mod.load_spec(tiny_study(tmp_path, n_trials=9))
    with pytest.raises(study_mod.StudyError, match="different spec.*--replace"):
        study_mod.create(other, url)
    assert study_mod.create(other, url, replace=True).created
    assert study_mod.load("tiny", url)[1].n_trials == 9


def test_workers_need_only_name_and_url(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    spec = spec_mod.load_spec(tiny_study(tmp_path))
    study_mod.create(spec, url)
    _, stored = study_mod.load("tiny", url)
    assert stored == spec


def test_unknown_study_lists_what_is_there(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path)), url)
    with pytest.raises(study_mod.StudyError, match=r"no study named 'nope' \(studies here: tiny\)"):
        study_mod.load("nope", url)


def test_best_trial_of_an_empty_study_is_a_clear_error(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path)), url)
    with pytest.raises(study_mod.StudyError, match="no finished trial"):
        study_mod.best_trial("tiny", url)


def test_passwords_are_masked():
    assert mask_url("postgresql+psycopg://alice:s3cret@db.example/cnn") == \
        "postgresql+psycopg://alice:***@db.example/cnn"


def test_storage_url_precedence(monkeypatch):
    monkeypatch.delenv("CNNSEARCH_STORAGE", raising=False)
    assert storage_url(None) == "sqlite:///cnnsearch.db"
    monkeypatch.setenv("CNNSEARCH_STORAGE", "sqlite:///x.db")
    assert storage_url(None) == "sqlite:///x.db"
    assert storage_url("sqlite:///y.db") == "sqlite:///y.db"


@pytest.mark.parametrize("url,fragment", [
    ("not a url", "malformed storage URL"),
    ("nosuchdb://x/y", "unknown database driver"),
])
def test_bad_storage_urls(url, fragment):
    with pytest.raises(StorageError, match=fragment):
        open_storage(url)


def test_unreachable_database_names_host_and_masks_password():
    with pytest.raises(StorageError) as info:
        open_storage("postgresql+psycopg://bob:hunter2@127.0.0.1:1/cnn")
    message = str(info.value)
    assert "127.0.0.1" in message and "hunter2" not in message and "\n" not in message


def _image_folder(root, classes=("cat", "dog", "owl"), per_class=12):
    from PIL import Image

    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            color = tuple(int(v) for v in ((k * 90 + i) % 256, (k * 40) % 256, 255 - k * 80))
            Image.new("RGB", (20 + i, 16), color).save(root / name / f"{i}.png")
    return root


def test_a_folder_study_stores_class_names_and_runs(tmp_path):
    from search.worker import run_worker

    images = _image_folder(tmp_path / "pets")
    path = _folder_study(tmp_path, images)
    url = f"sqlite:///{tmp_path}/s.db"
    made = study_mod.create(spec_mod.load_spec(path), url)
    assert made.study.user_attrs["classes"] == ["cat", "dog", "owl"]
    assert run_worker("tiny", url, device="cpu").stopped_because == "budget reached"
    assert sorted(p.name for p in images.iterdir()) == ["cat", "dog", "owl"]  # nothing written there


def test_train_takes_a_folder_directly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # train writes runs/<name>/ here
    from typer.testing import CliRunner

    from search.cli import app

    images = _image_folder(tmp_path / "pets")
    options = f'{{"path": "{images}", "image_size": 8, "channels": 1, "cache_dir": "{tmp_path / "c"}"}}'
    result = CliRunner().invoke(app, ["train", "--set", "dataset=folder", "--set", f"data_options={options}",
                                      "--set", "epochs=1", "--set", "batch_size=8", "--device", "cpu",
                                      "--set", 'model_params={"channels": [4], "padding": 1, "fc": [8]}'])
    assert result.exit_code == 0, result.output
    assert "test acc" in result.stdout


def _folder_study(tmp_path, images):
    text = tiny_study(tmp_path, n_trials=2, epochs=1).read_text().replace(
        'dataset = "synthetic"\ndata_options = { n = 400, classes = 4, channels = 1, size = 12, seed = 0 }',
        f'dataset = "folder"\ndata_options = {{ path = "{images}", image_size = 8, channels = 3, '
        f'cache_dir = "{tmp_path / "cache"}" }}')
    path = tmp_path / "pets.toml"
    path.write_text(text)
    return path


def test_create_is_all_or_nothing_when_the_folder_is_missing(tmp_path):
    """Listing the folder used to come after the study was made: a missing folder left a
    half-made study behind, and creating it again waited a minute for its spec, then refused."""
    import time

    from search.errors import DataError

    images = _image_folder(tmp_path / "pets")
    url = f"sqlite:///{tmp_path}/s.db"
    spec = spec_mod.load_spec(_folder_study(tmp_path, images))  # the folder was there then
    images.rename(tmp_path / "moved")
    with pytest.raises(DataError, match="does not exist"):
        study_mod.create(spec, url)
    # Nothing written: no database file at all (readers refuse one), or one without studies.
    assert not (tmp_path / "s.db").exists() or study_mod.list_studies(url) == []
    (tmp_path / "moved").rename(images)
    started = time.monotonic()
    made = study_mod.create(spec, url)
    assert made.created and made.study.user_attrs["classes"] == ["cat", "dog", "owl"]
    assert time.monotonic() - started < 20  # at once, not after waiting out a half-made study


def test_create_warns_when_the_data_is_not_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNSEARCH_DATA", str(tmp_path / "nodata"))
    path = tiny_study(tmp_path)
    path.write_text(path.read_text().replace(
        'dataset = "synthetic"\ndata_options = { n = 400, classes = 4, channels = 1, size = 12, seed = 0 }',
        'dataset = "mnist"'))
    made = study_mod.create(spec_mod.load_spec(path), f"sqlite:///{tmp_path}/s.db")
    assert made.created and len(made.warnings) == 1
    assert made.warnings[0].startswith(f"mnist not found in {tmp_path / 'nodata'} (looked for MNIST/raw/")
    synthetic = study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, name="other")), f"sqlite:///{tmp_path}/s.db")
    assert synthetic.warnings == ()


def test_readers_rebuild_the_stored_spec_without_validating_it_again(tmp_path, monkeypatch):
    """status, best, export and report take the spec as it was validated at create: rebuilt
    (the same StudySpec), not checked again against models and data (torch, a sampler trial)."""
    url = f"sqlite:///{tmp_path}/s.db"
    spec = spec_mod.load_spec(tiny_study(tmp_path, enqueue='[[enqueue]]\nlr = 1e-3\noptimizer = "sgd"\n'
                                                          'momentum = 0.5\n'))
    study_mod.create(spec, url)

    def no_validation(doc):
        raise AssertionError("a reader validated the stored spec again")

    monkeypatch.setattr(spec_mod, "_parse", no_validation)
    _, stored = study_mod.load("tiny", url, validate=False)
    assert stored == spec and spec_mod.spec_to_dict(stored) == spec_mod.spec_to_dict(spec)
    assert study_mod.summary("tiny", url)["budget"] == spec.n_trials
    with pytest.raises(spec_mod.SpecError, match="stored spec: space.lr.low: must be > 0"):
        bad = spec_mod.spec_to_dict(spec)
        bad["space"]["lr"]["low"] = 0
        spec_mod.spec_from_dict(bad, validate=False)  # the layout is still checked


def test_a_reader_that_cannot_reach_the_database_says_so_and_masks_the_password():
    with pytest.raises(StorageError) as info:
        open_storage("postgresql+psycopg://bob:hunter2@127.0.0.1:1/cnn", create=False)
    message = str(info.value)
    assert message.startswith("cannot reach the storage at 127.0.0.1") and "hunter2" not in message
