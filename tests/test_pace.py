"""What `status` says is left of a study at its measured pace (search/pace.py)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from search import pace
from search import spec as spec_mod
from search import study as study_mod
from search.cli import app
from search.finalstage import finalist_jobs
from search.worker import run_worker
from studykit import tiny_study

runner = CliRunner()
FINAL = '[[enqueue]]\nlr = 3e-3\noptimizer = "adam"\n\n[final]\nfinalists = 2\nepochs = 4\nseeds = 2\n'


def _spec(tmp_path, n_trials: int = 5, final: str = FINAL, subset: int | None = None) -> spec_mod.StudySpec:
    path = tiny_study(tmp_path, name="p", n_trials=n_trials, pruner='name = "NopPruner"', enqueue=final)
    if subset is not None:
        path.write_text(path.read_text().replace('dataset = "synthetic"', f'dataset = "synthetic"\nsubset = {subset}'))
    return spec_mod.load_spec(path)


def _trial(state: TrialState, epoch_seconds: list[float], images: int | None = 100, images_all: int = 400,
           wall: float | None = None, train_seconds: list[float] | None = None, lr: float = 1e-2, **attrs):
    """A stored trial whose start and end are `wall` seconds apart (default: its epochs' seconds),
    training `train_seconds` of each epoch's (default: all of it)."""
    attrs["epoch_seconds"] = epoch_seconds
    attrs["epoch_train_seconds"] = epoch_seconds if train_seconds is None else train_seconds
    if images is not None:
        attrs.update(train_images=images, train_images_all=images_all)
    t = create_trial(state=state, value=0.5 if state != TrialState.RUNNING else None, params={"lr": lr},
                     distributions={"lr": FloatDistribution(1e-6, 3e-2, log=True)}, user_attrs=attrs,
                     intermediate_values={i: 0.5 for i in range(len(epoch_seconds))})
    if state == TrialState.RUNNING:
        t.datetime_complete = None
    else:
        t.datetime_start = t.datetime_complete - timedelta(seconds=sum(epoch_seconds) if wall is None else wall)
    return t


def test_pace_is_images_over_seconds_and_what_is_left_is_shared_among_the_workers(tmp_path):
    spec = _spec(tmp_path)  # 5 trials; final: 2 finalists and the start, 4 epochs, 2 seeds
    # 100 images an epoch: 2 epochs in 2 s and 1 in 1 s -> 100 images/s; 1.5 epochs a trial
    trials = [_trial(TrialState.COMPLETE, [1.0, 1.0]), _trial(TrialState.PRUNED, [1.0])]
    one = pace.project(trials, spec, None, workers=1)
    assert one.pace.images_per_s == pytest.approx(100.0) and one.pace.epochs == 3
    assert one.search_s == pytest.approx(3 * 1.5)  # 3 trials to go
    # final stage, not started: 3 finalists x 4 epochs x 400 images (the whole training set), then
    # 1 more seed run of 4 epochs: one worker does them one after the other
    assert one.final_s == pytest.approx((3 * 4 * 400 + 4 * 400) / 100)
    two = pace.project(trials, spec, None, workers=2)
    # a job is not split: two trials side by side, then the third alone (no faster: none measured it)
    assert two.search_s == pytest.approx(1.5 + 1.5)
    assert two.final_s == pytest.approx(2 * 4 * 400 / 100 + 4 * 400 / 100)  # so are the third finalist and the seed run
    # workers by default: the trials running now (here one, 1 epoch in, so 0.5 epoch left)
    running = _trial(TrialState.RUNNING, [1.0])
    by_default = pace.project([*trials, running], spec, None)
    assert by_default.workers == 1 and by_default.search_s == pytest.approx((2 * 1.5 + 0.5) * 100 / 100)
    assert "pace: 100 training images/s a worker (over 3 epochs)" in pace.line(one)
    assert "search ~4 s, final stage ~64 s" in pace.line(one)


def test_the_pace_counts_a_trials_whole_time_and_only_the_epochs_it_trained_itself(tmp_path):
    spec = _spec(tmp_path)
    # 2 epochs of 100 images in 4 s from start to end (data loading, checkpoints): 50 images/s
    # 2 epochs of 100 images in 2 s, in 4 s from start to end: 2 s a job besides (data loading)
    measured = pace.project([_trial(TrialState.COMPLETE, [1.0, 1.0], wall=4.0)], spec, None, workers=1)
    assert measured.pace == pace.Pace(images_per_s=100, val_s=0, other_s=2, epochs=2)
    assert measured.search_s == pytest.approx(4 * (2 * 1 + 2))  # 4 trials to go, each as this one
    # a trial that trained nothing (infeasible) still took its time
    mixed = [_trial(TrialState.COMPLETE, [1.0, 1.0]), _trial(TrialState.PRUNED, [], wall=2.0)]
    assert pace.project(mixed, spec, None).pace == pace.Pace(images_per_s=100, val_s=0, other_s=1, epochs=2)
    # a retry that resumed at epoch 2 trained 1 of its 3 epochs in its 1 s
    retry = _trial(TrialState.COMPLETE, [1.0, 1.0, 1.0], wall=1.0, resumed_from_epoch=2)
    measured = pace.project([retry], spec, None)
    assert measured.pace.images_per_s == 100 and measured.pace.epochs == 1
    # trials stored before the training seconds were: their whole time counts as training
    old = _trial(TrialState.COMPLETE, [1.0, 1.0], wall=4.0)
    del old.user_attrs["epoch_train_seconds"]
    assert pace.project([old], spec, None).pace == pace.Pace(images_per_s=50, val_s=0, other_s=0, epochs=2)


def test_validation_is_timed_apart_so_a_small_search_subset_does_not_slow_the_final_stage(tmp_path):
    # The MNIST check in docs/results.md: on a small subset a search epoch validated as long as it
    # trained, and one rate over whole epochs made the final stage on 4x the images look 2x too slow.
    spec = _spec(tmp_path)  # final stage on 400 images an epoch, 4 epochs, 3 finalists + 1 seed run
    trials = [_trial(TrialState.COMPLETE, [2.0, 2.0], train_seconds=[1.0, 1.0], wall=5.0)]
    measured = pace.project(trials, spec, None, workers=1)
    assert measured.pace == pace.Pace(images_per_s=100, val_s=1, other_s=1, epochs=2)
    per_job = 4 * (400 / 100 + 1) + 1  # 4 epochs of 4 s training and 1 s validating, 1 s besides
    assert measured.final_s == pytest.approx(4 * per_job)
    assert measured.search_s == pytest.approx(4 * 5)  # 4 trials as this one: its 5 s
    assert "validation 1.0 s an epoch, 1 s a job besides (over 2 epochs)" in pace.line(measured)
    # a finalist running: 1 of its 4 epochs done, and no cost besides its epochs left to pay
    final = {"all_finalists": [{"number": 0, "state": "RUNNING", "epochs": 4, "epochs_done": 1, "history": [],
                                "seconds": None, "train_images": 400, "source_trial": None}],
             "seeds": [], "chosen": None, "done": False}
    assert pace.project(trials, spec, final, workers=1).final_s == pytest.approx(3 * 5 + per_job)


def test_no_pace_without_a_finished_trial_that_recorded_its_images(tmp_path):
    spec = _spec(tmp_path)
    assert pace.project([], spec, None) is None
    assert pace.project([_trial(TrialState.RUNNING, [1.0])], spec, None) is None
    # trials stored before the images were recorded, or with no epoch trained (infeasible)
    assert pace.project([_trial(TrialState.COMPLETE, [1.0], images=None)], spec, None) is None
    assert pace.project([_trial(TrialState.PRUNED, [], wall=3.0)], spec, None) is None
    no_final = pace.project([_trial(TrialState.COMPLETE, [2.0])], _spec(tmp_path, final=""), None, workers=1)
    assert no_final.final_s is None and "final stage" not in pace.line(no_final)


def test_each_final_job_is_timed_at_the_pace_its_own_configuration_measured(tmp_path):
    # a wide net trains at a third of a narrow one's pace: the study's mean would fit neither
    spec = _spec(tmp_path)  # 4 final epochs on 400 images, 2 seeds
    narrow, wide = (_trial(TrialState.COMPLETE, [s, s], train_seconds=[s, s], lr=s / 100) for s in (1.0, 3.0))
    narrow.number, wide.number = 0, 1
    measured = pace.project([narrow, wide], spec, None, workers=1)
    assert measured.pace.images_per_s == pytest.approx(50)  # 4 epochs of 100 images in 8 s

    def row(number, source, state, done=0, trained=(), chosen=None):
        """A final job as finalstage.results gives it; running, its history is not stored yet."""
        return {"number": number, "source_trial": source, "state": state, "epochs": 4, "epochs_done": done,
                "history": [], "epoch_train_seconds": list(trained), "seconds": None, "train_images": 400,
                "chosen": chosen}

    wide_job, narrow_job, start_job = 4 * 400 / 100 * 3, 4 * 400 / 100, 4 * 400 / 50  # 48 s, 16 s, 32 s
    # before the final stage: the two trials would be the finalists, each at its pace, and the start
    # (no search trial of its own) at the study's; then one seed run of one of the three
    before = pace.project([narrow, wide], spec, None, workers=1)
    assert before.final_s == pytest.approx(wide_job + narrow_job + start_job + (wide_job + narrow_job + start_job) / 3)

    # the wide one's finalist, 1 epoch in at its own pace (400 images in 12 s); the narrow one's waiting
    final = {"all_finalists": [row(0, 1, "RUNNING", 1, [12.0]),
                               row(1, 0, "WAITING")], "seeds": [], "chosen": None, "done": False}
    left = pace.project([narrow, wide], spec, final, workers=1)
    # finalists: 3 epochs of the wide one and the narrow one; one seed run, of which one not known yet
    assert left.final_s == pytest.approx(wide_job * 3 / 4 + narrow_job + (wide_job + narrow_job) / 2)
    # on 2 workers the finalists take as long as the wide one alone: a job is not shared
    assert pace.project([narrow, wide], spec, final, workers=2).final_s == pytest.approx(
        wide_job * 3 / 4 + (wide_job + narrow_job) / 2)
    # the wide one chosen: its seed run (source trial 1) at the wide pace
    final.update(chosen=final["all_finalists"][0], seeds=[row(2, 1, "WAITING", chosen=0)])
    final["all_finalists"][0].update(state="COMPLETE", epochs_done=4)
    final["all_finalists"][1].update(state="COMPLETE", epochs_done=4)
    assert pace.project([narrow, wide], spec, final, workers=1).final_s == pytest.approx(wide_job)
    # running alone, the seed run took the waiting worker's core after its first epoch: what is
    # left of it goes at its last 3 epochs' pace (400 images in 6 s each), not its trial's (12 s)
    final["seeds"] = [row(2, 1, "RUNNING", 5, [12.0, 12.0, 6.0, 6.0, 6.0], chosen=0)]
    final["seeds"][0]["epochs"] = 8
    assert pace.project([narrow, wide], spec, final, workers=1).final_s == pytest.approx(3 * 6.0)
    # a start that is no search trial: its seed run at its finalist's pace
    final["all_finalists"][0]["source_trial"] = None
    final["seeds"] = [row(2, None, "WAITING", chosen=0)]
    assert pace.project([narrow, wide], spec, final, workers=1).final_s == pytest.approx(wide_job)


def test_a_run_records_its_images_and_status_prints_the_pace(tmp_path):
    spec = _spec(tmp_path, n_trials=3, subset=100,
                 final='[[enqueue]]\nlr = 3e-3\noptimizer = "adam"\n\n[final]\nfinalists = 1\nepochs = 2\nseeds = 2\n')
    url = f"sqlite:///{tmp_path}/p.db"
    study_mod.create(spec, url)
    run_worker("p", url, device="cpu", worker_index=0)
    study, _ = study_mod.load("p", url, validate=False)
    trials = study.get_trials()
    # 400 synthetic images, 40 held out for validation: 360 to train on, the search's subset 100
    assert {(t.user_attrs["train_images"], t.user_attrs["train_images_all"]) for t in trials} == {(100, 360)}
    info = study_mod.summary("p", url)
    final = info["final"]
    assert final["done"] and all(r["train_images"] == 360 for r in final["all_finalists"] + final["seeds"])
    # each final job stored the training seconds of the epochs it trained itself, as it trained them
    for r in final["all_finalists"] + final["seeds"]:
        carried = (r["continued_from"] or {}).get("epoch", 0) if r["reused_from"] is None else len(r["history"])
        assert len(r["epoch_train_seconds"]) == len(r["history"]) - carried
        assert r["epoch_train_seconds"] == [round(h["train_seconds"], 3) for h in r["history"][carried:]]
        # and the CPU threads each epoch trained on (no launch here: torch's own, unchanged)
        assert r["epoch_threads"] == [torch.get_num_threads()] * len(r["epoch_train_seconds"])
    assert all(t.user_attrs["epoch_threads"] == [torch.get_num_threads()] * len(t.user_attrs["epoch_seconds"])
               for t in trials)
    done = info["projection"]
    assert done.search_s == 0 and done.final_s == 0
    status = runner.invoke(app, ["status", "p", "--storage", url, "--workers", "2"])
    assert status.exit_code == 0, status.output
    assert f"pace: {done.pace.images_per_s:.0f} training images/s a worker" in status.output
    assert "on 2 workers: search done, final stage done" in status.output
    # the same trials with two more to run and no final stage yet: 2 x mean epochs x 100 images
    bigger = dataclasses.replace(spec, n_trials=5)
    left = pace.project(trials, bigger, None, workers=1)
    m = left.pace
    assert all(len(t.user_attrs["epoch_train_seconds"]) == len(t.user_attrs["epoch_seconds"]) for t in trials)
    assert m.val_s > 0 and m.other_s > 0
    epochs = sum(len(t.user_attrs["epoch_seconds"]) for t in trials) / len(trials)
    assert left.search_s == pytest.approx(2 * (epochs * (100 / m.images_per_s + m.val_s) + m.other_s))
    # the finalists the search gives (the best trial and the start, or the start alone if it is the
    # best), each at the pace its trial measured; while no trial has completed (these tiny ones may
    # all stop at chance) one more at the study's pace; then one more seed run of one of them
    planned = finalist_jobs(trials, bigger)[0]
    assert [j["source_trial"] for j in planned][-1] == 0 and len(planned) in (1, 2)
    rate = {t.number: 100 * len(t.user_attrs["epoch_train_seconds"]) / sum(t.user_attrs["epoch_train_seconds"])
            for t in trials}
    each = [2 * (360 / rate[j["source_trial"]] + m.val_s) + m.other_s for j in planned]
    if not any(t.state == TrialState.COMPLETE for t in trials):
        each += [2 * (360 / m.images_per_s + m.val_s) + m.other_s] * (2 - len(planned))
    assert left.final_s == pytest.approx(sum(each) + sum(each) / len(each))


def test_status_refuses_a_workers_count_below_one(tmp_path):
    spec = _spec(tmp_path)
    url = f"sqlite:///{tmp_path}/p.db"
    study_mod.create(spec, url)
    before = [t.state for t in optuna.load_study(study_name="p", storage=url).trials]  # the enqueued start
    for bad in ("0", "-2", "two"):
        result = runner.invoke(app, ["status", "p", "--storage", url, "--workers", bad])
        assert result.exit_code == 2 and "--workers" in result.output and "Traceback" not in result.output
    assert [t.state for t in optuna.load_study(study_name="p", storage=url).trials] == before


def test_a_job_left_to_run_alone_goes_as_much_faster_as_the_study_measured(tmp_path):
    spec = _spec(tmp_path)  # 5 trials; final: 2 finalists and the start, 4 epochs on 400 images, 2 seeds
    plain = [_trial(TrialState.COMPLETE, [1.0, 1.0], epoch_threads=[1, 1], lr=1e-2),
             _trial(TrialState.COMPLETE, [1.0, 1.0], lr=2e-2)]
    # the search's last trial ran alone: its first epoch on launch's 1 thread, then on 2, 1.6x faster
    alone = _trial(TrialState.COMPLETE, [1.0, 0.625, 0.625], epoch_threads=[1, 2, 2], lr=3e-2)
    assert pace.speedups([pace._epochs_of(t) for t in [*plain, alone]]) == {2: 1.6}
    before = pace.project([*plain, alone], spec, None, workers=2)
    # its epochs count as on 1 thread (1 + 2 x 0.625 x 1.6 = 3 s: 100 images/s), like the others'
    assert before.pace.images_per_s == pytest.approx(100)
    job = 4 * 400 / 100  # a final run: 16 s on 1 thread
    # 3 finalists (two trials and the start): two side by side, the third alone at 1.6x; then the
    # one seed run left, alone too
    assert before.final_s == pytest.approx(job + job / 1.6 + job / 1.6)
    unmeasured = pace.project([*plain, _trial(TrialState.COMPLETE, [1.0, 1.0, 1.0], lr=3e-2)], spec, None, workers=2)
    assert unmeasured.final_s == pytest.approx(3 * job)  # as before: no speedup known, none assumed

    def row(state, done, trained=(), threads=()):
        return {"number": 9, "source_trial": 0, "state": state, "epochs": 4, "epochs_done": done, "history": [],
                "epoch_train_seconds": list(trained), "epoch_threads": list(threads), "seconds": None,
                "train_images": 400, "chosen": 9}

    finalist = {**row("COMPLETE", 4), "history": [{"epoch": e, "train_seconds": 4.0, "threads": 1, "val_acc": 0.5}
                                                   for e in range(4)]}
    # the seed run alone, on 2 threads since its second epoch (2.5 s an epoch): timed at that pace,
    # not slowed back to 1 thread because only one worker trains now (workers by default: 1)
    final = {"all_finalists": [finalist], "seeds": [row("RUNNING", 2, [4.0, 2.5], [1, 2])], "chosen": finalist,
             "done": False}
    assert pace.project([*plain, alone], spec, final).final_s == pytest.approx(2 * 2.5)
