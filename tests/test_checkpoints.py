"""search.checkpoints: a TrainState as a file or bytes, written atomically, read back or refused in one line."""

import pytest
import torch

from search import checkpoints, config, datasets, engine
from search.errors import CheckpointError, CnnsearchError


@pytest.fixture(scope="module")
def trained_state():
    cfg = config.RunConfig(dataset="digits", epochs=2, batch_size=64, subset=256, device="cpu")
    ds = datasets.dataset_for(cfg)
    state = engine.TrainState.start(cfg, ds, "cpu")
    next(engine.train_epochs(state, ds))  # one epoch
    return state, ds


def test_save_and_load_round_trip_with_extra(trained_state, tmp_path):
    state, ds = trained_state
    path = checkpoints.save_state(tmp_path / "c.pt", state, {"seed": 3, "runs": [{"a": 1.5}]})
    doc = checkpoints.load_state(path)
    assert doc["format"] == checkpoints.FORMAT and doc["seed"] == 3 and doc["runs"] == [{"a": 1.5}]
    again = engine.TrainState.resume(doc["state"], ds)
    assert again.epoch == 1
    for k, v in state.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])


def test_bytes_round_trip(trained_state):
    state, _ = trained_state
    doc = checkpoints.state_from_bytes(checkpoints.state_bytes(state, {"trial": 7}), "trial 7")
    assert doc["trial"] == 7 and doc["state"]["progress"]["epoch"] == 1


@pytest.mark.parametrize("content, fragment", [
    (None, "no such checkpoint"),
    ("truncated", "not a readable cnnsearch training checkpoint"),
    (b"hello, not a checkpoint", "not a readable cnnsearch training checkpoint"),
    ("foreign", "not a cnnsearch training checkpoint (format"),
])
def test_missing_truncated_or_foreign_file_is_one_line(trained_state, tmp_path, content, fragment):
    path = tmp_path / "c.pt"
    if content == "truncated":
        data = checkpoints.state_bytes(trained_state[0])
        path.write_bytes(data[:len(data) // 2])
    elif content == "foreign":
        torch.save({"state_dict": {}}, path)  # e.g. a model.pt
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_state(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_a_failing_write_leaves_the_previous_checkpoint_loadable(trained_state, tmp_path, monkeypatch):
    state, _ = trained_state
    path = checkpoints.save_state(tmp_path / "c.pt", state, {"n": 1})
    real_save = torch.save

    def half_then_full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full_disk)
    with pytest.raises(CnnsearchError, match="No space left"):
        checkpoints.save_state(path, state, {"n": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoints.load_state(path)["n"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_extra_cannot_shadow_the_state(trained_state):
    with pytest.raises(ValueError):
        checkpoints.state_bytes(trained_state[0], {"state": 1})
