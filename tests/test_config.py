import json

import pytest

from search import config
from search.config import ConfigError, RunConfig


def test_defaults_are_valid_and_round_trip():
    cfg = RunConfig()
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        config.from_dict({"learning_rate": 0.1})


@pytest.mark.parametrize("key,value,fragment", [
    ("lr", "fast", "lr: expected float"),
    ("epochs", 2.5, "epochs: expected int"),
    ("flip", 1, "flip: expected bool"),
    ("compile", "yes", "compile: expected bool"),
    ("optimizer", "lbfgs", "optimizer: expected one of"),
    ("scheduler", "plateau", "scheduler: expected one of"),
    ("precision", "fp16", "precision: expected one of"),
    ("lr", 0, "lr: must be > 0"),
    ("erasing", 1.5, "erasing: must be between 0 and 1"),
    ("val_fraction", 1.0, "val_fraction: must be in [0, 1)"),
    ("model_params", [1], "model_params: expected dict"),
    ("lr", float("nan"), "lr: expected a finite number, got nan"),
    ("weight_decay", float("inf"), "weight_decay: expected a finite number, got inf"),
    ("momentum", float("-inf"), "momentum: expected a finite number, got -inf"),
    ("val_fraction", float("nan"), "val_fraction: expected a finite number"),
    ("seed", -1, "seed: must be in [0, 2**32), got -1"),
    ("seed", 2**32, "seed: must be in [0, 2**32), got 4294967296"),
    ("val_seed", 2**64, "val_seed: must be in [0, 2**32)"),
])
def test_bad_values_name_the_key(key, value, fragment):
    with pytest.raises(ConfigError) as info:
        config.from_dict({key: value}, source="run.json")
    message = str(info.value)
    assert message.startswith("run.json: ") and fragment in message and "\n" not in message


def test_every_float_field_refuses_nan_and_infinities():
    """JSON parses NaN and Infinity (`--set weight_decay=Infinity`); no setting means them, and
    comparisons with NaN are all false, so `lr <= 0` let it through."""
    for key, f in config.FIELDS.items():
        if f.type.startswith("float"):
            for bad in (float("nan"), float("inf"), float("-inf")):
                with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number"):
                    config.from_dict({key: bad})


def test_seeds_at_the_ends_of_their_range():
    assert config.from_dict({"seed": 0, "val_seed": 2**32 - 1}).val_seed == 2**32 - 1
    with pytest.raises(ConfigError, match="seed"):
        config.load(None, ["seed=4294967296"])


def test_nesterov_needs_sgd_with_momentum():
    with pytest.raises(ConfigError, match="nesterov"):
        config.from_dict({"optimizer": "adam", "nesterov": True})
    assert config.from_dict({"optimizer": "sgd", "momentum": 0.9, "nesterov": True}).nesterov


def test_precedence_defaults_file_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.01\nepochs = 3\n[model_params]\nchannels = [8, 16]\ndropout = 0.1\n')
    cfg = config.load(path, ["epochs=5", "model_params.dropout=0.3", "optimizer=sgd"])
    assert (cfg.lr, cfg.epochs, cfg.optimizer) == (0.01, 5, "sgd")
    assert cfg.model_params == {"channels": [8, 16], "dropout": 0.3}
    assert cfg.batch_size == RunConfig().batch_size


def test_compile_is_set_from_the_command_line_and_survives_an_export(tmp_path):
    cfg = config.load(None, ["compile=true"])
    assert cfg.compile is True and RunConfig().compile is False
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"config": config.to_dict(cfg)}))
    assert config.load(path) == cfg
    assert config.from_dict({k: v for k, v in config.to_dict(cfg).items() if k != "compile"}).compile is False


def test_exported_file_reads_its_config_table(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"config": {"lr": 0.05}, "provenance": {"study": "x"}}))
    assert config.load(path).lr == 0.05


@pytest.mark.parametrize("text,fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a table"),
])
def test_bad_files(tmp_path, text, fragment):
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        config.load(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="no such file"):
        config.load("does/not/exist.json")


def test_set_needs_key_value():
    with pytest.raises(ConfigError, match="expected key=value"):
        config.parse_overrides(["lr"])
