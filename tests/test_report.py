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
                                  rng.randint(p.low, p.high) if p.type == "int" else rng.uniform(p.low, p.high))
        pruned = rng.random() < 0.4
        curve = {e: 0.5 + 0.05 * e + 0.1 * rng.random() for e in range(rng.randint(1, 3) if pruned else 8)}
        trials.append(create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=None if pruned else max(curve.values()),
            params=params, distributions={k: _distribution(p) for p in spec.space for k in [p.name] if k in params},
            intermediate_values=curve,
            user_attrs={"n_params": rng.randint(1_000, 100_000), "epoch_seconds": [0.5] * len(curve),
                        "stop_reason": f"pruned after epoch {len(curve) - 1}" if pruned else "finished"}))
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
