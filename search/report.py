"""A study as one self-contained HTML file to mail, and the same figures as PNG files.

The report reads the trials once into an in-memory study and draws every figure from bounded
views of it, so a study of thousands of trials takes seconds: epoch curves for the best trials
plus a sample (pruned ones included), importances from a sample of completed trials, parallel
coordinates over at most `_MAX_LINES` trials. plotly.js is inlined once in <head>, so the file
opens offline. PNGs are drawn with matplotlib (optuna.visualization.matplotlib and two figures
of our own): plotly's PNG export needs kaleido and a Chrome, which a server rarely has.
"""

from __future__ import annotations

import contextlib
import html
import json
import random
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import optuna
from optuna.trial import TrialState

import search
from search import config, space
from search import objectives
from search import study as study_mod
from search.files import write_atomic
from search.storage import Store, mask_url, open_store

_CURVES_TOP, _CURVES_SAMPLE = 20, 30  # epoch curves: the best trials, plus a sample of the rest
_IMPORTANCE_SAMPLE = 300  # fANOVA on more trials costs seconds and changes little
_MAX_LINES = 500  # parallel coordinates: one plotly trace per line; more is slow and a solid block


@dataclass
class Report:
    html: str
    figures: list[str]  # section titles, in order
    notes: dict[str, str] = field(default_factory=dict)  # title -> why a figure is missing
    png_files: list[Path] = field(default_factory=list)


def _seeded_sample(items: list, k: int) -> list:
    return items if len(items) <= k else random.Random(0).sample(items, k)


class _ReadOnlyStorage(optuna.storages.InMemoryStorage):
    """Plots only read trials: skip the deep copy of every trial the base class makes per read."""

    def get_all_trials(self, study_id, deepcopy=True, states=None):
        return super().get_all_trials(study_id, deepcopy=False, states=states)


@contextlib.contextmanager
def _quiet():
    """Optuna logs every in-memory study it creates and warns about empty plots: not for a report."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _view(trials: list, direction: str) -> optuna.Study:
    """An in-memory study holding `trials`: optuna's plots take a study, not a trial list."""
    with _quiet():
        view = optuna.create_study(storage=_ReadOnlyStorage(), direction=direction)
    view.add_trials(trials)
    return view


def _importances(view: optuna.Study) -> dict[str, float]:
    """fANOVA importances; a ValueError/RuntimeError (too few trials, one value) is the caller's note."""
    complete = [t for t in view.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        raise ValueError(f"needs at least 2 completed trials, the study has {len(complete)}")
    if all(len({json.dumps(t.params.get(p)) for t in complete}) < 2 for p in complete[0].params):
        raise ValueError("every parameter took a single value among the completed trials")
    # 16 shallow trees: the ranking matches the default 64 deep ones on our studies, 10x faster
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=16, max_depth=8, seed=0)
    importances = optuna.importance.get_param_importances(view, evaluator=evaluator)
    if not importances:
        raise ValueError("no parameter was searched in every completed trial (all are conditional)")
    return importances


def _curve_lines(trials: list, best_number: int | None):
    """(trial, group, colour, dashed, width) per curve: pruned ones over the others, the best on top."""
    order = {"complete": 0, "best": 2}
    lines = []
    for t in trials:
        group = "best" if t.number == best_number else t.state.name.lower()
        color = {"best": "#d62728", "complete": "#1f77b4"}.get(group, "#999999")
        lines.append((t, group, color, group not in ("best", "complete"), 3 if group == "best" else 1))
    return sorted(lines, key=lambda line: order.get(line[1], 1))


def _curves_figure(trials: list, best_number: int | None, metric: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    seen: set[str] = set()
    for t, group, color, dashed, width in _curve_lines(trials, best_number):
        steps = sorted(t.intermediate_values)
        fig.add_scatter(x=steps, y=[t.intermediate_values[s] for s in steps], mode="lines+markers",
                        name=group, legendgroup=group, showlegend=group not in seen,
                        line={"color": color, "dash": "dot" if dashed else "solid", "width": width},
                        hovertext=f"trial {t.number} ({t.state.name.lower()})", hoverinfo="text+y")
        seen.add(group)
    fig.update_layout(title="Intermediate values per epoch", xaxis_title="epoch (from 0)", yaxis_title=metric)
    return fig


def _importance_figure(importances: dict[str, float]):
    import plotly.graph_objects as go

    names = list(importances)[::-1]
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
    fig.update_layout(title="Parameter importances (fANOVA)", xaxis_title="importance")
    return fig


def _table(trials: list, metric: str) -> str:
    head = ("number", metric, "state", "params", "n_params", "s/epoch", "epochs", "stop reason")
    rows = []
    for t in trials:
        secs = t.user_attrs.get("epoch_seconds") or []
        per_epoch = f"{sum(secs) / len(secs):.2f}" if secs else ""
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        n_params = t.user_attrs.get("n_params")
        cells = (t.number, f"{t.value:.4f}" if t.value is not None else "", t.state.name.lower(), params,
                 f"{n_params:,}" if isinstance(n_params, int) else "", per_epoch, len(secs) or "",
                 t.user_attrs.get("stop_reason", ""))
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f'<table id="top-trials"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def build_report(study: optuna.Study, spec, *, url: str | None = None, top: int = 20,
                 png_dir: str | Path | None = None) -> Report:
    """The HTML report of `study` (and, with `png_dir`, its figures as PNG files).

    Args:
        study: the study; its trials are read once.
        spec: its StudySpec (for the metric, the description and the best config).
        url: the storage URL it was loaded from, shown in the header with the password masked.
        top: rows in the table of best trials.
        png_dir: also write each figure there as <name>.png (matplotlib).
    """
    from optuna import visualization as vis

    trials = study.get_trials(deepcopy=False)
    ranked = objectives.ranked(trials, spec.objectives)
    best = ranked[0] if ranked else None
    view = _view(trials, spec.direction)
    with_curves = [t for t in trials if t.intermediate_values]
    curve_set = {t.number for t in ranked[:_CURVES_TOP]}
    curve_set |= {t.number for t in _seeded_sample([t for t in with_curves if t.number not in curve_set],
                                                   _CURVES_SAMPLE)}
    curves = [t for t in with_curves if t.number in curve_set]
    lines_view = view if len(ranked) <= _MAX_LINES else _view(ranked[:_MAX_LINES // 2] + _seeded_sample(
        ranked[_MAX_LINES // 2:], _MAX_LINES // 2), spec.direction)

    figures: dict[str, tuple] = {}  # name -> (title, plotly figure or None, caption)
    notes: dict[str, str] = {}
    importances: dict[str, float] = {}

    def add(name: str, title: str, make, caption: str = "") -> None:
        try:
            with _quiet():
                figures[name] = (title, make(), caption)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            figures[name] = (title, None, "")
            notes[title] = f"not drawn: {' '.join(str(exc).split()) or exc.__class__.__name__}"

    def make_importances():
        importances.update(_importances(_view(_seeded_sample(ranked, _IMPORTANCE_SAMPLE), spec.direction)))
        return _importance_figure(importances)

    add("history", "Optimization history", lambda: vis.plot_optimization_history(view, target_name=spec.metric))
    add("intermediate", "Intermediate values per epoch", lambda: _curves_figure(curves, best and best.number,
        spec.metric), f"{len(curves)} of {len(with_curves)} trials: the best {_CURVES_TOP} and a sample; "
        "pruned trials dotted grey, the best in red")
    add("importances", "Parameter importances", make_importances,
        f"from {min(len(ranked), _IMPORTANCE_SAMPLE)} completed trials")
    add("parallel", "Parallel coordinates", lambda: vis.plot_parallel_coordinate(lines_view, target_name=spec.metric),
        f"{len(lines_view.trials)} of {len(trials)} trials" if lines_view is not view else "")
    add("slice", "Slice plots", lambda: vis.plot_slice(view, target_name=spec.metric))

    pngs = _write_pngs(Path(png_dir), view, lines_view, curves, best, importances, spec.metric, figures) \
        if png_dir else []
    best_cfg = json.dumps(config.to_dict(space.params_to_config(spec, best.params)), indent=2) if best else None
    page = _page(study, spec, trials, ranked[:top], figures, notes, best, best_cfg, url and mask_url(url))
    return Report(page, [title for title, _, _ in figures.values()], notes, pngs)


def _page(study, spec, trials, top_trials, figures, notes, best, best_cfg, storage_label) -> str:
    from plotly.offline import get_plotlyjs

    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    esc = html.escape
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no trials"
    best_line = (f"best: trial {best.number}, {spec.metric} {best.value:.4f}" if best else "no completed trial yet")
    parts = [f"<h1>Study {esc(study.study_name)}</h1>",
             f"<p>{esc(spec.description)}</p>" if spec.description else "",
             f"<p>{esc(spec.metric)} ({esc(spec.direction)}); {len(trials)} trials of a budget of {spec.n_trials} "
             f"({esc(summary)}); {esc(best_line)}.</p>",
             f"<p class='meta'>{f'storage {esc(storage_label)}; ' if storage_label else ''}"
             f"cnnsearch {esc(search.__version__)}; generated "
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}</p>"]
    for name, (title, fig, caption) in figures.items():
        parts.append(f'<section id="{name}"><h2>{esc(title)}</h2>')
        if fig is None:
            parts.append(f"<p class='note'>{esc(notes[title])}</p>")
        else:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}"))
            parts.append(f"<p class='meta'>{esc(caption)}</p>" if caption else "")
        parts.append("</section>")
    parts.append(f'<section id="top"><h2>Top {len(top_trials)} completed trials</h2>{_table(top_trials, spec.metric)}'
                 "</section>")
    if best_cfg:
        parts.append(f'<section id="best-config"><h2>Best config (trial {best.number})</h2>'
                     f"<p>What <code>cnnsearch export {esc(study.study_name)} -o best.json</code> writes under "
                     f'"config"; <code>cnnsearch train best.json</code> trains it.</p><pre>{esc(best_cfg)}</pre>'
                     "</section>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:left}.meta{color:#666;font-size:90%}.note{color:#a60}pre{background:#f6f6f6;padding:1em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cnnsearch: {esc(study.study_name)}</title>"
            f"<style>{style}</style><script>{get_plotlyjs()}</script></head><body>"
            + "\n".join(p for p in parts if p) + "</body></html>")


def _write_pngs(out: Path, view, lines_view, curves, best, importances, metric, figures) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as mvis

    def curves_plot():
        fig, ax = plt.subplots(figsize=(8, 5))
        seen: set[str] = set()
        for t, group, color, dashed, width in _curve_lines(curves, best and best.number):
            steps = sorted(t.intermediate_values)
            ax.plot(steps, [t.intermediate_values[s] for s in steps], ":" if dashed else "-", color=color,
                    lw=width, label=None if group in seen else group)
            seen.add(group)
        ax.set(title="Intermediate values per epoch", xlabel="epoch (from 0)", ylabel=metric)
        ax.legend()
        return ax

    def importance_plot():
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.4 * len(importances))))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(title="Parameter importances (fANOVA)", xlabel="importance")
        return ax

    makers = {"history": lambda: mvis.plot_optimization_history(view, target_name=metric),
              "intermediate": curves_plot, "importances": importance_plot,
              "parallel": lambda: mvis.plot_parallel_coordinate(lines_view, target_name=metric),
              "slice": lambda: mvis.plot_slice(view, target_name=metric)}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, fig, _) in figures.items():
        if fig is None:
            continue
        with _quiet():
            axes = makers[name]()
        figure = getattr(axes, "figure", None) or axes.ravel()[0].figure
        figure.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(out / f"{name}.png")
    return written


def write_report(name: str, path: str | Path, store: Store | str | None = None, *, top: int = 20,
                 png_dir: str | Path | None = None) -> Report:
    """Load study `name` and write its report to `path` (atomically); see `build_report`."""
    store = open_store(store, heartbeat_interval=None)
    study, spec = study_mod.load(name, store)
    report = build_report(study, spec, url=store.url, top=top, png_dir=png_dir)
    write_atomic(path, lambda f: f.write(report.html.encode()))
    return report
