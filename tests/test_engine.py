import math

import pytest
import torch

import models
from search import datasets, engine
from search.augment import Normalizer
from search.config import RunConfig
from search.errors import CheckpointError, DeviceError

SYNTH = {"n": 600, "classes": 4, "channels": 1, "size": 12, "seed": 0}


def synth_cfg(**changes) -> RunConfig:
    base = dict(dataset="synthetic", data_options=SYNTH, model="convnet",
                model_params={"channels": [8, 16], "padding": 1, "fc": [32]},
                epochs=4, batch_size=32, lr=3e-3, device="cpu", warmup_epochs=2)
    return RunConfig(**{**base, **changes})


def test_fit_learns_synthetic_and_reports_every_epoch():
    seen = []
    result = engine.fit(synth_cfg(), on_epoch=lambda e, m: seen.append((e, m["val_acc"])))
    assert [e for e, _ in seen] == [0, 1, 2, 3]
    assert result.stop_reason == "finished"
    assert result.best_val_acc >= 0.9
    assert result.best_val_acc == max(acc for _, acc in seen)
    assert result.test_acc is None and result.n_params > 0


def test_same_seed_same_result_on_cpu():
    a = engine.fit(synth_cfg(epochs=2, flip=True, crop_padding=2, erasing=0.5))
    b = engine.fit(synth_cfg(epochs=2, flip=True, crop_padding=2, erasing=0.5))
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert [h["val_acc"] for h in a.history] == [h["val_acc"] for h in b.history]
    c = engine.fit(synth_cfg(epochs=2, seed=1, flip=True, crop_padding=2, erasing=0.5))
    assert [h["train_loss"] for h in a.history] != [h["train_loss"] for h in c.history]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_precisions_learn_and_say_which_they_used(precision):
    result = engine.fit(synth_cfg(precision=precision), evaluate_test=True)
    assert result.precision == precision
    assert result.best_val_acc >= 0.9 and result.test_acc >= 0.9


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_convs_run_in_the_reported_precision_on_channels_last_tensors(device, precision, dtype):
    """Not just the label: every conv, in training and evaluation, computes in that dtype on NHWC input."""
    seen = set()

    def record(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            seen.add((output.dtype, args[0].is_contiguous(memory_format=torch.channels_last), output.device.type))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        rgb = {**SYNTH, "channels": 3}  # a 1-channel NCHW tensor is NHWC-contiguous too: it would prove nothing
        result = engine.fit(synth_cfg(precision=precision, device=device, data_options=rgb), evaluate_test=True)
    finally:
        handle.remove()
    assert result.precision == precision and result.device.startswith(device)
    assert seen == {(dtype, True, device)}
    assert result.best_val_acc >= 0.9


def test_auto_precision_is_bf16_only_where_the_hardware_has_it():
    cpu = torch.device("cpu")
    assert engine.uses_bf16("auto", cpu) == engine.native_bf16(cpu)
    assert engine.uses_bf16("bf16", cpu) and not engine.uses_bf16("fp32", cpu)
    assert engine.fit(synth_cfg(epochs=1)).precision == ("bf16" if engine.native_bf16(cpu) else "fp32")


def test_nan_loss_stops_with_reason_instead_of_raising():
    result = engine.fit(synth_cfg(optimizer="sgd", lr=1e12, epochs=6))
    assert result.stop_reason.startswith("diverged:")
    assert len(result.history) < 6


def test_stuck_at_chance_stops_after_warmup():
    # lr 1e-9 never leaves chance, like the seeds' lr 1e-5 runs that sat at 10% on CIFAR-10.
    calls = []
    result = engine.fit(synth_cfg(optimizer="sgd", lr=1e-9, epochs=8, warmup_epochs=2),
                        on_epoch=lambda e, m: calls.append(e))
    assert result.stop_reason.startswith("diverged: validation accuracy")
    assert len(result.history) == 2 and calls == [0]


def test_on_epoch_exceptions_propagate():
    class Stop(Exception):
        pass

    def hook(epoch, metrics):
        raise Stop

    with pytest.raises(Stop):
        engine.fit(synth_cfg(), on_epoch=hook)


def test_final_training_evaluates_test_once_and_full_train_skips_val():
    result = engine.fit(synth_cfg(epochs=2), evaluate_test=True, full_train=True)
    assert 0.0 <= result.test_acc <= 1.0 and math.isfinite(result.test_loss)
    assert all("val_acc" not in h for h in result.history)


@pytest.mark.parametrize("scheduler", ["step", "cosine", "onecycle"])
def test_schedulers_change_the_learning_rate(scheduler):
    result = engine.fit(synth_cfg(epochs=3, scheduler=scheduler, step_size=1, step_gamma=0.5))
    lrs = [h["lr"] for h in result.history]
    assert lrs[-1] < 3e-3
    if scheduler == "step":
        assert lrs == pytest.approx([1.5e-3, 7.5e-4, 3.75e-4])


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_trains(optimizer):
    cfg = synth_cfg(epochs=1, optimizer=optimizer, momentum=0.9 if optimizer in ("sgd", "rmsprop") else 0.0,
                    lr=0.05 if optimizer == "sgd" else 1e-3)
    assert math.isfinite(engine.fit(cfg).history[0]["train_loss"])


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="no CUDA device"):
        engine.resolve_device("cuda:0")


# --- the training state: epoch-by-epoch training, checkpoints, resume ----------------------------

NET = {"channels": [8, 16], "padding": 1, "fc": [32]}
REGULARISED = {**NET, "dropout": 0.2, "fc_dropout": 0.3, "batchnorm": True}
TIMINGS = ("train_seconds", "samples_per_s", "seconds")


def on_cpu(cfg: RunConfig):
    return datasets.to_device(datasets.dataset_for(cfg), "cpu")


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMINGS} for h in history]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def assert_same_run(a: "engine.TrainState", b: "engine.TrainState") -> None:
    assert_same_tensors(a.model.state_dict(), b.model.state_dict())
    assert_same_tensors(a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"])
    assert untimed(a.history) == untimed(b.history)
    assert (a.epoch, a.best_val_acc, a.best_epoch, a.stop_reason) == (b.epoch, b.best_val_acc, b.best_epoch,
                                                                     b.stop_reason)


RESUMABLE = {
    # dropout + BatchNorm, augmentation drawing from the global RNG, StepLR (per epoch), SGD momentum
    "sgd-step": (dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, scheduler="step", step_size=2,
                      step_gamma=0.7, flip=True, crop_padding=2, erasing=0.5, model_params=REGULARISED), False),
    # Adam state, OneCycle (per batch, also cycles Adam's betas), channel dropout
    "adam-onecycle": (dict(optimizer="adam", scheduler="onecycle", flip=True, crop_padding=1, erasing=0.3,
                           model_params={**REGULARISED, "dropout2d": True}), False),
    # cosine (per batch) on train + validation, as the final training runs
    "adamw-cosine-full": (dict(optimizer="adamw", weight_decay=0.01, scheduler="cosine", erasing=0.5,
                               model_params=REGULARISED), True),
}


@pytest.mark.parametrize("stop_after", [1, 2])
@pytest.mark.parametrize("case", list(RESUMABLE))
def test_resuming_a_saved_state_in_a_fresh_one_is_bitwise_the_uninterrupted_run(tmp_path, case, stop_after):
    changes, full_train = RESUMABLE[case]
    cfg = synth_cfg(epochs=3, **changes)
    ds = on_cpu(cfg)
    whole = engine.TrainState.start(cfg, ds, full_train=full_train)
    assert len(list(engine.train_epochs(whole, ds))) == 3 and whole.stop_reason == "finished"

    first = engine.TrainState.start(cfg, ds, full_train=full_train)
    for metrics in engine.train_epochs(first, ds):
        if metrics["epoch"] + 1 == stop_after:
            break
    torch.save(first.state_dict(), tmp_path / "run.pt")
    del first

    # As a restarted process: a new state (start() seeds the global RNG), then other global RNG
    # states, so that only load_state_dict can put back the saved ones.
    resumed = engine.TrainState.start(cfg, ds, full_train=full_train)
    torch.manual_seed(1234)
    torch.rand(100)
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    resumed.load_state_dict(saved)
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch_cpu"])
    assert resumed.epoch == stop_after and resumed.stop_reason is None
    rest = [m["epoch"] for m in engine.train_epochs(resumed, ds)]
    assert rest == list(range(stop_after, 3))
    assert_same_run(resumed, whole)
    if not full_train:
        assert resumed.best_epoch >= 0


def test_train_epochs_yields_once_per_epoch_and_a_caller_can_stop_and_continue():
    cfg = synth_cfg(epochs=4, flip=True, erasing=0.5, model_params=REGULARISED)
    ds = on_cpu(cfg)
    state = engine.TrainState.start(cfg, ds)
    for metrics in engine.train_epochs(state, ds):
        assert metrics is state.history[-1] and state.epoch == metrics["epoch"] + 1
        if metrics["epoch"] == 1:
            break
    assert state.epoch == 2 and state.stop_reason is None
    torch.rand(1000)  # the caller draws from the global RNG meanwhile: the run owns its streams
    assert [m["epoch"] for m in engine.train_epochs(state, ds)] == [2, 3]
    assert state.stop_reason == "finished" and len(state.history) == 4
    assert list(engine.train_epochs(state, ds)) == []  # a finished run trains no further

    whole = engine.fit(cfg, dataset=ds)
    assert_same_run(state, whole.state)
    assert whole.best_val_acc == state.best_val_acc and whole.stop_reason == "finished"


def test_the_last_yielded_epoch_already_says_finished():
    cfg = synth_cfg(epochs=2)
    ds = on_cpu(cfg)
    state = engine.TrainState.start(cfg, ds)
    reasons = [state.stop_reason for _ in engine.train_epochs(state, ds)]
    assert reasons == [None, "finished"]  # a checkpoint saved after the last epoch is a finished run


def test_draws_between_epochs_do_not_shift_training():
    cfg = synth_cfg(epochs=2, flip=True, crop_padding=1, erasing=0.5, model_params=REGULARISED)
    quiet = engine.fit(cfg)
    noisy = engine.fit(cfg, on_epoch=lambda e, m: torch.rand(1000))
    assert_same_run(quiet.state, noisy.state)


def test_fit_continues_a_resumed_state_for_its_remaining_epochs(tmp_path):
    cfg = synth_cfg(epochs=3, optimizer="sgd", lr=0.05, momentum=0.9, scheduler="onecycle",
                    flip=True, model_params=REGULARISED)
    whole = engine.fit(cfg, evaluate_test=True)
    ds = on_cpu(cfg)
    state = engine.TrainState.start(cfg, ds)
    next(engine.train_epochs(state, ds))
    torch.save(state.state_dict(), tmp_path / "run.pt")

    torch.manual_seed(99)
    resumed = engine.TrainState.resume(torch.load(tmp_path / "run.pt", weights_only=True), ds)
    seen = []
    result = engine.fit(cfg, lambda e, m: seen.append(e), dataset=ds, evaluate_test=True, state=resumed)
    assert seen == [1, 2] and result.stop_reason == "finished"
    assert_same_run(result.state, whole.state)
    assert (result.best_val_acc, result.best_epoch, result.test_acc) == (whole.best_val_acc, whole.best_epoch,
                                                                         whole.test_acc)


def test_state_dict_is_plain_data_that_only_loads_into_the_same_run(tmp_path):
    cfg = synth_cfg(epochs=2, scheduler="step", step_size=1)
    ds = on_cpu(cfg)
    state = engine.TrainState.start(cfg, ds)
    torch.save(state.state_dict(), tmp_path / "run.pt")
    saved = torch.load(tmp_path / "run.pt", weights_only=True)  # would refuse a pickled object
    assert saved["cfg"]["lr"] == cfg.lr and saved["scaler"] is None and saved["progress"]["epoch"] == 0

    with pytest.raises(CheckpointError, match="lr"):
        engine.TrainState.start(cfg.replace(lr=1e-2), ds).load_state_dict(saved)
    with pytest.raises(CheckpointError, match="full_train"):
        engine.TrainState.start(cfg, ds, full_train=True).load_state_dict(saved)
    engine.TrainState.start(cfg.replace(device="auto", data_dir="/elsewhere"), ds).load_state_dict(saved)
    with pytest.raises(ValueError, match="another run"):
        engine.fit(cfg.replace(lr=1e-2), dataset=ds, state=state)


def test_a_diverged_epoch_is_recorded_but_not_yielded():
    cfg = synth_cfg(optimizer="sgd", lr=1e-9, epochs=8, warmup_epochs=2)
    ds = on_cpu(cfg)
    state = engine.TrainState.start(cfg, ds)
    assert [m["epoch"] for m in engine.train_epochs(state, ds)] == [0]
    assert state.stop_reason.startswith("diverged: validation accuracy") and len(state.history) == 2
    assert list(engine.train_epochs(state, ds)) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_run_saves_and_restores_its_cuda_rng(tmp_path):
    cfg = synth_cfg(epochs=2, device="cuda", flip=True, erasing=0.5, model_params=REGULARISED)
    ds = datasets.to_device(datasets.dataset_for(cfg), "cuda")
    state = engine.TrainState.start(cfg, ds)
    next(engine.train_epochs(state, ds))
    torch.save(state.state_dict(), tmp_path / "run.pt")
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert saved["rng"]["torch_cuda"] is not None

    resumed = engine.TrainState.start(cfg, ds)
    torch.cuda.manual_seed(1234)
    resumed.load_state_dict(saved)
    assert torch.equal(torch.cuda.get_rng_state(), saved["rng"]["torch_cuda"])
    assert [m["epoch"] for m in engine.train_epochs(resumed, ds)] == [1]
    assert resumed.stop_reason == "finished"  # not bitwise: cuDNN may pick other kernels per process


# --- compiled training (cfg.compile) ------------------------------------------------------------

COMPILED = dict(epochs=2, flip=True, erasing=0.5, model_params=REGULARISED)


@pytest.fixture(scope="session")
def inductor():
    """Skips where inductor cannot compile here (no working C++ compiler): a two-element probe."""
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except torch._dynamo.exc.BackendCompilerFailed as err:
        pytest.skip(f"torch.compile (inductor) cannot compile on this machine: {str(err).splitlines()[0]}")


def compiled_ran(state: "engine.TrainState") -> bool:
    return isinstance(state.forward, engine.CompiledOrEager) and state.forward.compiled is not None


@pytest.mark.filterwarnings("error:compile:RuntimeWarning")  # falling back to eager would prove nothing
def test_a_compiled_fit_saves_the_plain_model_and_learns_as_eager_does(inductor):
    eager = engine.fit(synth_cfg(**COMPILED), evaluate_test=True)
    compiled = engine.fit(synth_cfg(**COMPILED, compile=True), evaluate_test=True)
    assert compiled_ran(compiled.state) and compiled.model is compiled.state.model
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())
    # Not bitwise: inductor fuses and reorders the element-wise work (other rounding, in bf16 more
    # so), and its dropout masks come from its own random kernels, not from eager's draws.
    for e, c in zip(eager.history, compiled.history):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=0.1)
        assert abs(c["val_acc"] - e["val_acc"]) <= 0.1
    assert compiled.test_acc >= 0.7 and abs(compiled.test_acc - eager.test_acc) <= 0.1


@pytest.mark.filterwarnings("error:compile:RuntimeWarning")
def test_a_compiled_run_resumes_from_its_checkpoint(inductor, tmp_path):
    cfg = synth_cfg(**COMPILED, compile=True)
    ds = on_cpu(cfg)
    whole = engine.TrainState.start(cfg, ds)
    list(engine.train_epochs(whole, ds))

    first = engine.TrainState.start(cfg, ds)
    next(engine.train_epochs(first, ds))
    torch.save(first.state_dict(), tmp_path / "run.pt")
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert not any(key.startswith("_orig_mod.") for key in saved["model"])

    # As a restarted process: nothing compiled yet, so the resumed epoch compiles its graphs
    # afresh (a static one for the full batches first), where the whole run reused epoch 0's.
    torch._dynamo.reset()
    torch.manual_seed(1234)
    resumed = engine.TrainState.resume(saved, ds)
    assert [m["epoch"] for m in engine.train_epochs(resumed, ds)] == [1]
    assert compiled_ran(resumed) and resumed.stop_reason == "finished"
    assert_same_run(resumed, whole)


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")  # what force_disable_caches says
def test_without_a_cxx_compiler_a_compiled_run_warns_once_and_trains_eager(monkeypatch, request):
    """As on a machine without a C++ compiler: inductor's cxx points at a missing file."""
    request.addfinalizer(torch._dynamo.reset)  # later tests compile with the real compiler
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/c++"))
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)  # a cached kernel needs no compiler
    torch._dynamo.reset()  # nor does a graph compiled earlier in this process
    cfg = synth_cfg(epochs=2, model_params=REGULARISED)
    with pytest.warns(RuntimeWarning, match="compile: torch.compile failed, training eager instead") as caught:
        compiled = engine.fit(cfg.replace(compile=True))
    assert sum("eager instead" in str(w.message) for w in caught) == 1 and not compiled_ran(compiled.state)
    assert_same_run(compiled.state, engine.fit(cfg).state)


# --- CUDA graphs (cfg.cuda_graph) ---------------------------------------------------------------

def test_graphs_are_used_only_where_the_run_can_be_captured():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert engine.graph_blocker(synth_cfg(), cuda) is None
    assert engine.graph_blocker(synth_cfg(optimizer="sgd", momentum=0.9, scheduler="step"), cuda) is None
    assert "CUDA only" in engine.graph_blocker(synth_cfg(), cpu)
    assert "cuda_graph = false" in engine.graph_blocker(synth_cfg(cuda_graph=False), cuda)
    assert "compile" in engine.graph_blocker(synth_cfg(compile=True), cuda)
    # rmsprop and one-cycle replay too, with the optimizer's update eager after the graph
    assert engine.graph_blocker(synth_cfg(optimizer="rmsprop"), cuda) is None
    assert engine.graph_blocker(synth_cfg(scheduler="onecycle"), cuda) is None
    assert engine.graph_updates(synth_cfg()) and engine.graph_updates(synth_cfg(optimizer="sgd", scheduler="cosine"))
    assert not engine.graph_updates(synth_cfg(optimizer="rmsprop"))
    assert not engine.graph_updates(synth_cfg(scheduler="onecycle"))
    result = engine.fit(synth_cfg(epochs=1))  # on the CPU: eager, and says so
    assert not result.cuda_graph and result.state.graph_replays == 0


def test_a_saved_optimizers_capturable_flag_does_not_follow_it_into_another_process():
    """A run saved from CUDA graphs (capturable Adam) continues on the CPU, and the other way round."""
    cfg = synth_cfg(epochs=2)
    ds = on_cpu(cfg)
    state = engine.TrainState.start(cfg, ds)
    next(engine.train_epochs(state, ds))
    saved = state.state_dict()
    saved["optimizer"]["param_groups"][0]["capturable"] = True  # as a graph run's checkpoint has it
    resumed = engine.TrainState.resume(saved, ds)
    assert resumed.optimizer.param_groups[0]["capturable"] is False
    assert [m["epoch"] for m in engine.train_epochs(resumed, ds)] == [1]


def max_weight_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item()
               for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


GRAPH_RUNS = [dict(optimizer="adam", scheduler="cosine"),  # lr changes every step: the graph must see it
              dict(optimizer="adamw", weight_decay=0.05, scheduler="step", step_size=1, step_gamma=0.5),
              dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, scheduler="cosine"),
              # the update eager after each replay: one-cycle's momentum changes, rmsprop's update
              dict(optimizer="adamw", scheduler="onecycle"),
              dict(optimizer="sgd", lr=0.05, momentum=0.9, scheduler="onecycle"),
              dict(optimizer="rmsprop", lr=1e-3, momentum=0.5, scheduler="step", step_size=1, step_gamma=0.5)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("changes", GRAPH_RUNS, ids=lambda c: f"{c['optimizer']}-{c['scheduler']}")
def test_cuda_graph_steps_train_as_eager_steps_do(changes):
    """No randomness in the steps (no dropout, no augmentation), fp32: the graph replays the same
    arithmetic, so the weights agree with eager's up to cuDNN's rounding, far closer than a run
    whose learning rate differs by 10%, which a graph that missed the scheduler's changes would be."""
    torch.backends.cudnn.deterministic = True
    try:
        cfg = synth_cfg(device="cuda", epochs=3, precision="fp32", **changes)
        ds = datasets.to_device(datasets.dataset_for(cfg), "cuda")
        graphed = engine.fit(cfg, dataset=ds)
        eager = engine.fit(cfg.replace(cuda_graph=False), dataset=ds)
        other_lr = engine.fit(cfg.replace(cuda_graph=False, lr=cfg.lr * 1.1), dataset=ds)
    finally:
        torch.backends.cudnn.deterministic = False
    steps = len(ds.train_y) // cfg.batch_size
    assert graphed.cuda_graph and graphed.state.graph_replays == 3 * (steps - engine.GraphedSteps.WARMUP)
    assert not eager.cuda_graph and eager.state.graph_replays == 0
    assert [h["lr"] for h in graphed.history] == [h["lr"] for h in eager.history]
    near, far = max_weight_diff(graphed.state, eager.state), max_weight_diff(other_lr.state, eager.state)
    assert near < far / 20, (near, far)
    for g, e in zip(graphed.history, eager.history):
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_graphed_run_with_dropout_and_augmentation_learns_and_resumes(tmp_path):
    cfg = synth_cfg(device="cuda", epochs=3, flip=True, crop_padding=1, erasing=0.5, model_params=REGULARISED)
    ds = datasets.to_device(datasets.dataset_for(cfg), "cuda")
    torch.backends.cudnn.deterministic = True
    try:
        state = engine.TrainState.start(cfg, ds)
        next(engine.train_epochs(state, ds))
        torch.save(state.state_dict(), tmp_path / "run.pt")
        resumed = engine.TrainState.resume(torch.load(tmp_path / "run.pt", weights_only=True), ds)
        assert [m["epoch"] for m in engine.train_epochs(resumed, ds)] == [1, 2]
        # two continuations of one checkpoint draw the same dropout and augmentation through their graphs
        again = engine.TrainState.resume(torch.load(tmp_path / "run.pt", weights_only=True), ds)
        list(engine.train_epochs(again, ds))
    finally:
        torch.backends.cudnn.deterministic = False
    assert resumed.graph_replays > 0 and resumed.stop_reason == "finished"
    # 4 classes: chance is 25%; eager on the CPU reaches 70-80% after these 3 heavily regularised
    # epochs (seeds 0-2), the H200's graphs 71.7%; a graph that did not train would stay near 25%
    assert resumed.best_val_acc >= 0.5
    losses = [h["train_loss"] for h in resumed.history]
    assert [h["train_loss"] for h in again.history] == pytest.approx(losses, rel=1e-5)


def test_a_step_that_cannot_be_captured_is_one_line_naming_cuda_graph_false(monkeypatch):
    """Where capture fails (on a GPU: a forward that asks the host, as .item() does), the run stops
    with one line that says how to train it; the optimizer keeps its float learning rate."""
    class Refused:
        def __init__(self, graph):
            pass

        def __enter__(self):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", Refused)
    cfg = synth_cfg()
    ds = on_cpu(cfg)
    state = engine.TrainState.start(cfg, ds)
    steps = engine.GraphedSteps(lambda idx, update: None, state.optimizer, 540, 32, torch.device("cpu"))
    with pytest.raises(DeviceError, match=r"^cuda_graph: this run's training step could not be captured as a "
                       r"CUDA graph \(operation not permitted when stream is capturing\); train it with "
                       r"cuda_graph = false$"):
        steps.replay()
    assert state.optimizer.param_groups[0]["lr"] == cfg.lr and steps.graph is None


def test_tta_flip_scores_the_mean_of_each_image_and_its_mirror_images_logits():
    cfg = synth_cfg(epochs=1, tta_flip=True, precision="fp32")  # the check below computes in fp32
    result = engine.fit(cfg, evaluate_test=True)
    ds = datasets.dataset_for(cfg)
    norm = Normalizer(ds.mean, ds.std, torch.device("cpu"))
    model = result.model.eval()
    with torch.no_grad():
        x = norm(ds.test_x)
        logits = (model(x) + model(x.flip(3))) / 2
    expected_loss = torch.nn.functional.cross_entropy(logits, ds.test_y).item()
    expected_acc = (logits.argmax(1) == ds.test_y).float().mean().item()
    assert result.test_loss == pytest.approx(expected_loss, rel=1e-4)
    assert result.test_acc == pytest.approx(expected_acc)
    plain_loss, _ = engine.evaluate(model, ds.test_x, ds.test_y, norm)  # without the flip: another number
    assert plain_loss != pytest.approx(expected_loss, rel=1e-4)
    assert result.history[-1]["val_loss"] == pytest.approx(  # validation is scored the same way
        engine.evaluate(model, ds.val_x, ds.val_y, norm, tta_flip=True)[0], rel=1e-4)


def test_tta_flip_changes_nothing_on_mirror_symmetric_images():
    torch.manual_seed(0)
    half = torch.randint(0, 256, (16, 1, 12, 6), dtype=torch.uint8)
    x = torch.cat([half, half.flip(3)], dim=3)  # each image its own mirror image
    y = torch.randint(0, 4, (16,))
    model = models.build_model(synth_cfg(), (1, 12, 12), 4).eval()
    norm = Normalizer((0.5,), (0.25,), torch.device("cpu"))
    assert engine.evaluate(model, x, y, norm, tta_flip=True) == pytest.approx(engine.evaluate(model, x, y, norm))
