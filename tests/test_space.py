"""The search space: conditional suggestions, params -> RunConfig, and shipped spaces that always build."""

from __future__ import annotations

import itertools
from pathlib import Path

import optuna
import pytest

from search import config
from search.space import SpaceError, contains, corner_params, params_to_config, suggest_params
from search.spec import load_spec, spec_to_dict

STUDIES = Path(__file__).parent.parent / "studies"
IN_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_trials(spec, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    seen = []

    def objective(trial):
        params = suggest_params(trial, spec)
        assert trial.params == params  # nothing suggested beyond what is returned
        seen.append(params)
        return 0.0

    study.optimize(objective, n_trials=n)
    return seen


@pytest.fixture(scope="module")
def digits():
    return load_spec(STUDIES / "digits_quick.toml")


def test_momentum_only_with_sgd_and_adaptive_size_only_with_adaptive_heads(digits):
    trials = run_trials(digits, 30)
    for params in trials:
        assert ("momentum" in params) == (params["optimizer"] == "sgd"), params
        assert ("adaptive_size" in params) == params["head"].startswith("adaptive"), params
    # both sides of each condition were seen, so the test could have failed
    assert {p["optimizer"] == "sgd" for p in trials} == {True, False}
    assert {"adaptive_size" in p for p in trials} == {True, False}


def test_conditions_on_conditional_parents(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[study]\nname = "t"\nn_trials = 1\n'
        '[space.nesterov]\ntype = "categorical"\nchoices = [false, true]\nwhen = { optimizer = ["sgd"] }\n'
        '[space.momentum]\ntype = "float"\nlow = 0.5\nhigh = 0.9\nwhen = { optimizer = ["sgd"] }\n'
        '[space.optimizer]\ntype = "categorical"\nchoices = ["sgd", "adam"]\n'
        '[space.warm]\ntype = "int"\nlow = 0\nhigh = 2\nwhen = { nesterov = [true] }\ntarget = "warmup_epochs"\n')
    for params in run_trials(load_spec(path), 30, seed=1):
        assert ("nesterov" in params) == ("momentum" in params) == (params["optimizer"] == "sgd")
        assert ("warm" in params) == (params.get("nesterov") is True)


def test_suggestions_stay_inside_the_space():
    spec = load_spec(STUDIES / "cifar10_threeconv.toml")
    by_name = {p.name: p for p in spec.space}
    for params in run_trials(spec, 20, seed=3):
        assert all(contains(by_name[name], value) for name, value in params.items())
        assert params.get("step_size", 5) % 5 == 0


def test_enqueued_config_is_the_first_trial(digits):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(digits.enqueue[0])
    params = suggest_params(study.ask(), digits)
    assert {name: params[name] for name in digits.enqueue[0]} == digits.enqueue[0]
    assert "momentum" not in params and "adaptive_size" not in params  # adam, flatten head


def test_params_to_config_writes_every_target_without_touching_the_spec(digits):
    before = spec_to_dict(digits)
    cfg = params_to_config(digits, {"lr": 0.01, "optimizer": "sgd", "momentum": 0.9, "batch_size": 64,
                                    "batchnorm": True, "dropout": 0.2, "pool_1": "avg", "pool_2": "none",
                                    "head": "adaptive_max", "adaptive_size": 2})
    assert isinstance(cfg, config.RunConfig)
    assert (cfg.dataset, cfg.model, cfg.epochs) == ("digits", "convnet", 8)
    assert (cfg.lr, cfg.optimizer, cfg.momentum, cfg.batch_size) == (0.01, "sgd", 0.9, 64)
    assert cfg.model_params["pool"] == ["avg", "none"]
    assert cfg.model_params["channels"] == [16, 32]  # untouched fixed values stay
    assert (cfg.model_params["head"], cfg.model_params["adaptive_size"], cfg.model_params["batchnorm"]) == (
        "adaptive_max", 2, True)
    assert spec_to_dict(digits) == before
    assert digits.fixed["model_params"]["pool"] == ["max", "max"]


def test_params_to_config_keeps_fixed_values_for_params_not_given(digits):
    cfg = params_to_config(digits, {"pool_2": "avg"})
    assert cfg.model_params["pool"] == ["max", "avg"]
    assert cfg.optimizer == config.RunConfig.optimizer


def test_params_to_config_rejects_unknown_params_and_bad_values(digits):
    with pytest.raises(SpaceError, match="unknown parameter 'lrr'"):
        params_to_config(digits, {"lrr": 0.1})
    with pytest.raises(config.ConfigError, match=r"^study digits_quick: lr: must be > 0") as info:
        params_to_config(digits, {"lr": -1.0})
    assert "\n" not in str(info.value)


def test_corner_params_cover_every_choice_with_conditions_met(digits):
    corners = list(corner_params(digits.space))
    assert corners[0][0] is None
    for param, value, params in corners[1:]:
        assert params[param.name] == value
    momentum = [params for param, _, params in corners if param is not None and param.name == "momentum"]
    assert [p["momentum"] for p in momentum] == [0.5, 0.99] and all(p["optimizer"] == "sgd" for p in momentum)
    heads = {params["head"] for param, _, params in corners if param is not None and param.name == "adaptive_size"}
    assert heads == {"adaptive_avg"}


def test_corner_pairs_meet_every_two_values_that_can_meet(tmp_path):
    from search.space import corner_pairs

    path = tmp_path / "s.toml"
    path.write_text('[study]\nname = "t"\nn_trials = 1\n'
                    '[space.optimizer]\ntype = "categorical"\nchoices = ["sgd", "adam"]\n'
                    '[space.momentum]\ntype = "float"\nlow = 0.5\nhigh = 0.9\nwhen = { optimizer = ["sgd"] }\n'
                    '[space.nesterov]\ntype = "categorical"\nchoices = [false, true]\n'
                    'when = { optimizer = ["sgd"] }\n'
                    '[space.batch_size]\ntype = "categorical"\nchoices = [16, 32]\n')
    pairs = {(p.name, v, q.name, w) for p, v, q, w, params in corner_pairs(load_spec(path).space)
             if params[p.name] == v and params[q.name] == w}
    assert ("momentum", 0.9, "nesterov", True) in pairs and ("nesterov", True, "batch_size", 32) in pairs
    assert not any(("adam" in (v, w)) and "nesterov" in (p, q) for p, v, q, w in pairs)  # never together
    assert ("optimizer", "adam", "batch_size", 16) in pairs
    # optimizer with momentum or nesterov: sgd only (2 + 2); every other pair: 2 x 2 values (4 pairs)
    assert len(pairs) == 2 + 2 + 4 * 4


def in_shape(spec) -> tuple[int, int, int]:
    if spec.data["dataset"] == "folder":
        options = spec.data["data_options"]
        return options["channels"], options["image_size"], options["image_size"]
    return IN_SHAPES[spec.data["dataset"]]


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_space_builds_a_model_at_every_corner_and_random_point(path, monkeypatch, request):
    from models import build_model

    if 'dataset = "folder"' in path.read_text():  # load_spec lists the folder
        monkeypatch.setenv("CNNSEARCH_DATA", str(request.getfixturevalue("shared_datasets")))
    spec = load_spec(path)
    points = [params for _, _, params in corner_params(spec.space)] + run_trials(spec, 10, seed=5)
    for params in points:
        cfg = params_to_config(spec, params)
        build_model(cfg, in_shape(spec), 10)  # raises ModelConfigError for an impossible architecture


def test_every_digits_architecture_fits_8x8(digits):
    from models import build_model

    heads = [("flatten", None)] + [(h, s) for h in ("adaptive_avg", "adaptive_max") for s in (1, 2)]
    pools = ["none", "max", "avg"]
    for pool_1, pool_2, (head, size), bn in itertools.product(pools, pools, heads, (False, True)):
        params = {"pool_1": pool_1, "pool_2": pool_2, "head": head, "batchnorm": bn, "dropout": 0.4}
        if size is not None:
            params["adaptive_size"] = size
        build_model(params_to_config(digits, params), (1, 8, 8), 10)


def test_params_with_exclusive_conditions_may_share_a_target(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[study]\nname = "t"\nn_trials = 1\n'
        '[space.optimizer]\ntype = "categorical"\nchoices = ["sgd", "adam"]\n'
        '[space.lr_sgd]\ntype = "float"\nlow = 1e-2\nhigh = 1e-1\nlog = true\ntarget = "lr"\n'
        'when = { optimizer = ["sgd"] }\n'
        '[space.lr_adam]\ntype = "float"\nlow = 1e-4\nhigh = 1e-3\nlog = true\ntarget = "lr"\n'
        'when = { optimizer = ["adam"] }\n')
    spec = load_spec(path)
    for params in run_trials(spec, 10):
        lr = params_to_config(spec, params).lr
        assert lr == params["lr_sgd" if params["optimizer"] == "sgd" else "lr_adam"]
