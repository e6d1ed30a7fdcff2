"""The HTML report: figures, top-trials table, best config, masking; small and 2,000-trial studies."""

import random
import re
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from search import space
from search import spec as spec_mod
from search import study as study_mod
from search.cli import app
from search.report import build_report

from studykit import quick_study  # noqa: E402

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
FIGURES = ("history", "intermediate", "importances", "parallel", "slice")

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A study of three trials run by the real worker."""
    folder = tmp_path_factory.mktemp("report")
    return folder, quick_study(folder, "small", n_trials=3, n=300,
                               description="three tiny trials for the report test")


def test_report_cli_writes_one_self_contained_file_with_figures_table_and_config(small):
    folder, url = small
    result = runner.invoke(app, ["report", "small", "-o", str(folder / "r.html"), "--png", str(folder / "png"),
                                 "--storage", url])
    assert result.exit_code == 0, result.output
    page = (folder / "r.html").read_text()
    for name in FIGURES:
        assert f'id="fig-{name}"' in page, name
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js inline: the file works offline
    assert page.count("plotly.js v") == 1  # ... and only once
    table = re.search(r'<table id="top-trials">.*?</table>', page, re.S).group(0)
    study, spec, best = study_mod.best_trial("small", url)
    assert table.count("<tr>") == 1 + 3 and f"<td>{best.value:.4f}</td>" in table and "finished" in table
    assert '&quot;model&quot;: &quot;convnet&quot;' in page and "three tiny trials" in page
    assert sorted(p.name for p in (folder / "png").iterdir()) == sorted(f"{n}.png" for n in FIGURES)


def test_report_masks_the_storage_password(small):
    _, url = small
    study, spec = study_mod.load("small", url, heartbeat_interval=None)
    page = build_report(study, spec, url="postgresql+psycopg://search:hunter2@db.example/cnnsearch").html
    assert "hunter2" not in page and "search:***@db.example" in page


def _spec_file(tmp_path, name):
    text = (REPO / "studies" / "digits_quick.toml").read_text().replace('name = "digits_quick"', f'name = "{name}"')
    (tmp_path / f"{name}.toml").write_text(text)
    return spec_mod.load_spec(tmp_path / f"{name}.toml")


def _distribution(p):
    if p.type == "categorical":
        return CategoricalDistribution(list(p.choices))
    cls = IntDistribution if p.type == "int" else FloatDistribution
    return cls(p.low, p.high, log=p.log, step=p.step) if p.step else cls(p.low, p.high, log=p.log)


def fake_trials(spec, n, seed=0):
    """n finished trials with the spec's (conditional) params, epoch curves and our user attrs."""
    rng = random.Random(seed)
    trials = []
    for _ in range(n):
        params = {}
        for p in spec.space:
            if space.is_active(p, params):
                params[p.name] = (rng.choice(p.choices) if p.type == "categorical" else
                                  rng.randrange(p.low, p.high + 1, p.step or 1) if p.type == "int" else
                                  p.low + p.step * rng.randint(0, int((p.high - p.low) / p.step)) if p.step else
                                  rng.uniform(p.low, p.high))
        pruned = rng.random() < 0.4
        curve = {e: 0.5 + 0.05 * e + 0.1 * rng.random() for e in range(rng.randint(1, 3) if pruned else 8)}
        trials.append(create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=None if pruned else max(curve.values()),
            params=params, distributions={k: _distribution(p) for p in spec.space for k in [p.name] if k in params},
            intermediate_values=curve,
            user_attrs={"n_params": rng.randint(1_000, 100_000), "epoch_seconds": [0.5] * len(curve),
                        "stop_reason": f"pruned after epoch {len(curve)}" if pruned else "finished"}))
    return trials


def test_too_few_trials_for_importances_is_a_note_not_a_crash(tmp_path):
    spec = _spec_file(tmp_path, "few")
    study = optuna.create_study(direction="maximize")
    report = build_report(study, spec)  # no trial at all
    assert "no completed trial yet" in report.html and "Parameter importances" in report.notes
    template = fake_trials(spec, 1)[0]
    for value in (0.5, 0.6):  # one completed trial, then a second with the same params
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params=template.params,
                                     distributions=template.distributions))
        report = build_report(study, spec)
        assert "Parameter importances" in report.notes and 'id="fig-history"' in report.html
    assert "single value" in report.notes["Parameter importances"]


def test_report_of_2000_trials_is_bounded(tmp_path):
    spec = _spec_file(tmp_path, "big")
    study = optuna.create_study(study_name="big", direction="maximize")
    study.add_trials(fake_trials(spec, 2000))
    started = time.perf_counter()
    report = build_report(study, spec, top=25)
    print(f"report of 2,000 trials: {time.perf_counter() - started:.1f} s, {len(report.html) / 1e6:.1f} MB")
    assert not report.notes
    assert report.html.count("<tr>") == 1 + 25
    assert re.search(r"50 of \d{3,4} trials: the best 20 and a sample", report.html)  # curves are capped
    assert '"name":"pruned"' in report.html  # pruned runs are drawn, as their own legend group
    assert "500 of 2000 trials" in report.html  # parallel coordinates are capped too


# Legibility: each figure sized for what it shows, and honest importances ---------------------

MIN_FONT_PT = 9  # at 100 dpi, the PNGs' resolution


def _report_with_pngs(spec, n_trials, folder, monkeypatch):
    """build_report of n fake trials with PNGs; each matplotlib figure as it is saved: its size in
    inches, its text (content, points) and the inches of its drawn axes."""
    import matplotlib
    from matplotlib.figure import Figure

    saved = {}
    savefig = Figure.savefig

    def record(figure, path, *args, **kwargs):
        figure.canvas.draw()  # the final layout (constrained, tight) before measuring
        axes = [ax for ax in figure.axes if ax.get_visible()]
        saved[Path(path).stem] = {
            "inches": tuple(figure.get_size_inches()),
            "texts": [(t.get_text(), t.get_fontsize()) for t in figure.findobj(matplotlib.text.Text)
                      if t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes in axes)],
            "axes": [(ax.get_window_extent().width / figure.dpi, ax.get_window_extent().height / figure.dpi)
                     for ax in axes]}
        return savefig(figure, path, *args, **kwargs)

    study = optuna.create_study(study_name=spec.name, direction=spec.direction)
    study.add_trials(fake_trials(spec, n_trials))
    with monkeypatch.context() as patch:
        patch.setattr(Figure, "savefig", record)
        report = build_report(study, spec, png_dir=folder)
    return report, saved


@pytest.fixture(scope="module")
def few_and_many(tmp_path_factory):
    """A study of 3 parameters (2 always searched) and 12 trials; one of 19 parameters with long
    names (`dropout_after_block_1`, ...: optuna cut them to one indistinguishable label) and 80."""
    from studykit import tiny_study

    folder = tmp_path_factory.mktemp("legible")
    few = spec_mod.load_spec(tiny_study(folder, "few"))
    text = re.sub(r"\bdropout_(\d)\b", r"dropout_after_block_\1",
                  (REPO / "studies" / "cifar10_sixconv.toml").read_text())
    (folder / "many.toml").write_text(text.replace('name = "cifar10_sixconv"', 'name = "many"'))
    many = spec_mod.load_spec(folder / "many.toml")
    assert len(few.space) == 3 and len(many.space) == 19
    with pytest.MonkeyPatch.context() as patch:
        return {"few": _report_with_pngs(few, 12, folder / "few", patch) + (folder / "few",),
                "many": _report_with_pngs(many, 80, folder / "many", patch) + (folder / "many",)}


def _caption(page, name):
    return re.search(rf'<section id="{name}">.*?</section>', page, re.S).group(0)


def test_importances_say_they_are_noise_for_a_small_study_and_not_for_a_large_one(few_and_many):
    (few, few_figs, _), (many, many_figs, _) = few_and_many["few"], few_and_many["many"]
    small, large = _caption(few.html, "importances"), _caption(many.html, "importances")
    complete = [int(re.search(r"from (\d+) completed trials", c).group(1)) for c in (small, large)]
    assert complete[0] < 30 <= complete[1]
    warning = "importances are mostly noise; read them as a rough hint"
    assert "completed trials: with this few, " + warning in small  # the HTML caption
    assert warning not in large and "mostly noise" not in many.html
    assert re.search(r"from \d+ completed trials; they hold for the ranges searched", large)  # a shorter note
    title = lambda figs: " ".join(" ".join(t.split()) for t, _ in figs["importances"]["texts"])  # noqa: E731
    assert "mostly noise" in title(few_figs) and "mostly noise" not in title(many_figs)  # ... and the PNG


def test_png_size_grows_with_the_number_of_parameters_within_bounds(few_and_many):
    from PIL import Image

    size = {k: {p.stem: Image.open(p).size for p in folder.glob("*.png")}
            for k, (_, _, folder) in few_and_many.items()}
    assert sorted(size["few"]) == sorted(size["many"]) == sorted(FIGURES)
    few, many = size["few"], size["many"]
    assert many["parallel"][0] > few["parallel"][0] * 1.4  # wider: 9 axes instead of 4
    assert many["slice"][1] > few["slice"][1] * 2  # taller: 4 rows of panels instead of 1
    assert many["importances"][1] > few["importances"][1] * 1.5  # taller: a bar per parameter
    for study in (few, many):
        for name, (width, height) in study.items():
            assert 500 <= width <= 1600 and 200 <= height <= 1400, (name, width, height)


def test_pngs_have_no_text_under_9_points_and_room_per_panel(few_and_many):
    (_, few, _), (many_report, many, _) = few_and_many["few"], few_and_many["many"]
    for figs in (few, many):
        for name, fig in figs.items():
            small = [(text, size) for text, size in fig["texts"] if size < MIN_FONT_PT]
            assert not small, (name, small[:5])
    # slice plots: a grid of panels at least 3 x 2.2 inches (optuna's one row of 19 panels: 1.5 wide)
    panels = [ax for ax in many["slice"]["axes"] if ax[0] > 1.0]  # not the colorbar: narrow
    assert len(panels) == 12 and all(w >= 3.0 and h >= 2.2 for w, h in panels), panels
    assert "the 12 most important of 19 parameters" in _caption(many_report.html, "slice")
    # parallel coordinates: the 8 most important parameters (said in the caption), full names,
    # at least an inch between axes
    labels = [t for t, _ in many["parallel"]["texts"]]
    assert "the 8 most important of 19 parameters" in _caption(many_report.html, "parallel")
    assert "dropout_after_block_1" in labels or "dropout_after_block_2" in labels or \
        "dropout_after_block_3" in labels
    assert not any(label.endswith("...") for label in labels)
    width = max(w for w, _ in many["parallel"]["axes"])
    assert width / 8 >= 1.0 and many["parallel"]["inches"][0] <= 16


def test_the_curves_axis_says_it_counts_optuna_steps_not_epochs_from_1(few_and_many):
    """Optuna's steps count from 0 while every epoch shown elsewhere counts from 1: the axis says so."""
    report, figs, _ = few_and_many["few"]
    label = "Optuna step (= epoch - 1)"
    assert label in [text for text, _ in figs["intermediate"]["texts"]]  # the PNG
    assert label in report.html and "epoch (from 0)" not in report.html  # the HTML figure
