import math

import pytest
import torch

from search import engine
from search.config import RunConfig

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


def test_flip_mirrors_about_half_the_batch():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5).repeat(200, 1, 1, 1)
    y = engine.batch_flip(x)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 150 < int(flipped.sum()) < 250


def test_crop_is_a_shifted_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = engine.batch_crop(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(64):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(y[i], w) for w in windows)
    assert not torch.equal(x, y)


def test_erasing_blanks_one_rectangle_within_scale():
    torch.manual_seed(0)
    x = torch.ones(256, 3, 32, 32)
    y = engine.batch_erase(x, p=1.0)
    zeros = (y == 0).all(1)
    frac = zeros.flatten(1).float().mean(1)
    assert bool((frac > 0).all()) and float(frac.max()) <= 0.34
    rows, cols = zeros.any(2), zeros.any(1)
    assert bool(((rows.sum(1) * cols.sum(1)) == zeros.flatten(1).sum(1)).all())  # a filled rectangle
    assert torch.equal(engine.batch_erase(x, p=0.0), x)


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        engine.resolve_device("cuda:0")
