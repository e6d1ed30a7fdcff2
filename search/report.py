"""A study as one self-contained HTML file to mail, and the same figures as PNG files.

The report reads the trials once into an in-memory study and draws every figure from bounded
views of it, so a study of thousands of trials takes seconds: epoch curves for the best trials
plus a sample (pruned ones included), importances from a sample of completed trials, parallel
coordinates over at most `_MAX_LINES` trials. plotly.js is inlined once in <head>, so the file
opens offline. PNGs are drawn with matplotlib (optuna.visualization.matplotlib and figures of our
own): plotly's PNG export needs kaleido and a Chrome, which a server rarely has.

Every figure is sized for what it shows, so that it reads at its default size: slice plots are a
grid that grows by rows, parallel coordinates show the most important parameters only, by their
full names, and the importances say how little they mean when few trials have completed.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import random
import textwrap
import warnings
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import optuna
from optuna.trial import TrialState

import search
from search import config, space
from search import finalstage, objectives
from search import study as study_mod
from search.files import write_atomic
from search.storage import Store, open_store, trial_id
from search.urls import mask_url

_CURVES_TOP, _CURVES_SAMPLE = 20, 30  # epoch curves: the best trials, plus a sample of the rest
_IMPORTANCE_SAMPLE = 300  # fANOVA on more trials costs seconds and changes little
_MAX_LINES = 500  # parallel coordinates: one plotly trace per line; more is slow and a solid block
# Legibility: every figure is sized for what it shows, and no text in a PNG is under _MIN_FONT pt
# (at 100 dpi). Parallel coordinates keep the _MAX_AXES most important parameters (more axes
# crowd into an unreadable block); slice plots are a grid of _SLICE_COLS columns, at most
# _MAX_SLICES panels, the most important parameters first.
_MAX_AXES, _MAX_SLICES, _SLICE_COLS = 8, 12, 3
_MIN_FONT = 9
_FEW_TRIALS = 30  # fewer completed trials than this: importances are mostly noise, and say so


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


def _importance_caveat(n_complete: int) -> str:
    """What the importances rest on; a warning when that is too little to mean much."""
    trials = f"{n_complete} completed trial{'s' if n_complete != 1 else ''}"
    if n_complete < _FEW_TRIALS:
        return f"from {trials}: with this few, importances are mostly noise; read them as a rough hint"
    return f"from {trials}; they hold for the ranges searched, not beyond them"


def _plot_params(trials: list, importances: dict[str, float], order: list[str]) -> list[str]:
    """The parameters of the completed `trials`: by importance, then the rest in `order` (the spec's)."""
    seen = {name for t in trials if t.state == TrialState.COMPLETE for name in t.params}
    rest = [n for n in order if n in seen and n not in importances]
    return [n for n in importances if n in seen] + rest + sorted(seen - set(importances) - set(rest))


@dataclass
class _Slice:
    """One slice panel: x (a category's index for a categorical), the metric, the trial numbers."""

    name: str
    xs: list[float]
    ys: list[float]
    numbers: list[int]
    log: bool = False
    labels: list[str] | None = None  # categorical: the tick labels, in choice order


def _slices(trials: list, params: list[str]) -> list[_Slice]:
    """The slice panels of `params` over the completed trials (a trial without the param is left out)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    jitter = random.Random(0)
    panels = []
    for name in params:
        having = [t for t in done if name in t.params]
        if not having:
            continue
        dist = having[0].distributions[name]
        panel = _Slice(name, [], [t.value for t in having], [t.number for t in having])
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            choices = {json.dumps(c): c for t in having for c in getattr(t.distributions[name], "choices", ())}
            choices.update({json.dumps(t.params[name]): t.params[name] for t in having})  # old trials, too
            keys = list(choices)
            panel.labels = [str(c) for c in choices.values()]
            # spread a category's points sideways, so that a dozen trials are a dozen dots
            panel.xs = [keys.index(json.dumps(t.params[name])) + jitter.uniform(-0.15, 0.15) for t in having]
        else:
            panel.log = bool(getattr(dist, "log", False))
            panel.xs = [t.params[name] for t in having]
        panels.append(panel)
    return panels


def _slice_grid(n: int) -> tuple[int, int]:
    cols = min(n, _SLICE_COLS)
    return max(1, math.ceil(n / max(cols, 1))), max(cols, 1)


def _slice_figure(panels: list[_Slice], metric: str):
    """Slice plots as a grid: one row per _SLICE_COLS parameters, the figure as tall as it needs."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not panels:
        raise ValueError("no completed trial")
    rows, cols = _slice_grid(len(panels))
    fig = make_subplots(rows=rows, cols=cols, shared_yaxes="all", horizontal_spacing=0.05,
                        vertical_spacing=min(0.3 / rows, 0.12))
    numbers = [n for p in panels for n in p.numbers]
    for i, p in enumerate(panels):
        row, col = divmod(i, cols)
        fig.add_scatter(
            x=p.xs, y=p.ys, mode="markers", row=row + 1, col=col + 1, showlegend=False,
            hovertext=[f"trial {n}" for n in p.numbers], hoverinfo="text+y",
            marker={"size": 8, "color": p.numbers, "colorscale": "Blues", "cmin": min(numbers),
                    "cmax": max(numbers), "line": {"width": 0.5, "color": "grey"}, "showscale": i == 0,
                    "colorbar": {"title": "trial", "len": 1.0 if rows == 1 else max(0.4, 1.6 / rows),
                                 "y": 1.0, "yanchor": "top"}})
        xaxis = {"title_text": p.name, "row": row + 1, "col": col + 1}
        if p.labels is not None:
            xaxis.update(tickmode="array", tickvals=list(range(len(p.labels))), ticktext=p.labels,
                         range=[-0.5, len(p.labels) - 0.5])
        elif p.log:
            xaxis.update(type="log", exponentformat="power")
        fig.update_xaxes(**xaxis)
        if col == 0:
            fig.update_yaxes(title_text=metric, showticklabels=True, row=row + 1, col=col + 1)
    fig.update_layout(title="Slice plots", height=120 + 280 * rows)
    return fig


def _parallel_figure(view: optuna.Study, params: list[str], metric: str):
    """optuna's parallel coordinates of `params`, with their full names (optuna cuts them at 17
    characters: `dropout_after_block_1` and `_2` read the same) at an angle."""
    from optuna import visualization as vis

    fig = vis.plot_parallel_coordinate(view, params=params, target_name=metric)
    names = [metric] + sorted(params)  # optuna's axis order: the objective, then the params by name
    if len(fig.layout.xaxis.ticktext or ()) == len(names):
        fig.update_xaxes(ticktext=names, tickangle=-30 if len(names) > 5 else 0)
    fig.update_layout(height=500, margin={"b": 130})
    return fig


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
    fig.update_layout(title="Intermediate values per epoch", xaxis_title="Optuna step (= epoch - 1)", yaxis_title=metric)
    return fig


def _importance_figure(importances: dict[str, float], caveat: str):
    import plotly.graph_objects as go

    names = list(importances)[::-1]
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
    fig.update_layout(title=f"Parameter importances (fANOVA)<br><sup>{html.escape(caveat)}</sup>",
                      xaxis_title="importance", height=160 + 28 * len(names), margin={"t": 90})
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
    pareto = ""
    if spec.multi:  # the Pareto front first; then the usual page about the learned objective alone
        pareto = _pareto_section(study, spec, trials)
        trials = [_learned_only(t, spec) for t in trials if "infeasible" not in t.user_attrs]
        spec = dataclasses.replace(spec, objectives=(spec.learned,))
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

    n_importance = min(len(ranked), _IMPORTANCE_SAMPLE)
    caveat = _importance_caveat(n_importance)

    def make_importances():
        importances.update(_importances(_view(_seeded_sample(ranked, _IMPORTANCE_SAMPLE), spec.direction)))
        return _importance_figure(importances, caveat)

    add("history", "Optimization history", lambda: vis.plot_optimization_history(view, target_name=spec.metric))
    add("intermediate", "Intermediate values per epoch", lambda: _curves_figure(curves, best and best.number,
        spec.metric), f"{len(curves)} of {len(with_curves)} trials: the best {_CURVES_TOP} and a sample; "
        "pruned trials dotted grey, the best in red")
    add("importances", "Parameter importances", make_importances, caveat)
    # drawn after the importances: they choose and order the parameters of the next two figures
    params = _plot_params(ranked, importances, [p.name for p in spec.space])

    def first(k: int) -> str:
        return f"the {k} {'most important' if len(importances) >= k else 'first'} of {len(params)} parameters"

    axes = params[:_MAX_AXES]
    add("parallel", "Parallel coordinates", lambda: _parallel_figure(lines_view, axes, spec.metric), "; ".join(
        ([f"{len(lines_view.trials)} of {len(trials)} trials"] if lines_view is not view else [])
        + ([first(len(axes))] if len(params) > len(axes) else [])))
    panels = _slices(trials, params[:_MAX_SLICES])
    add("slice", "Slice plots", lambda: _slice_figure(panels, spec.metric),
        "completed trials, darker ones later; categories spread sideways"
        + (f"; {first(len(panels))}" if len(params) > len(panels) else ""))

    final = finalstage.results(study, spec)
    if final is not None and (final["finalists"] or final["seeds"]):
        add("final-curves", "Final stage: validation per epoch", lambda: _final_figure(final),
            "finalists dashed, seed runs solid; the chosen finalist's line is the first seed's")

    pngs = _write_pngs(Path(png_dir), view, lines_view, curves, best, importances, spec.metric, figures,
                       axes=axes, panels=panels, caveat=caveat, final=final) if png_dir else []
    best_cfg = json.dumps(config.to_dict(space.params_to_config(spec, best.params)), indent=2) if best else None
    page = _page(study, spec, trials, ranked[:top], figures, notes, best, best_cfg, url and mask_url(url), final,
                 pareto)
    return Report(page, [title for title, _, _ in figures.values()], notes, pngs)


def _final_figure(final: dict):
    """The final stage's validation curves: one line per finalist (dashed) and seed run."""
    import plotly.graph_objects as go

    metric = final["metric"]
    fig = go.Figure()
    for role, rows, dash in (("finalist", final["finalists"], "dash"), ("seed", final["seeds"], "solid")):
        for r in rows:
            pts = [(h["epoch"] + 1, h[metric]) for h in r["history"] if metric in h]
            if not pts:
                continue
            label = (f"finalist: {finalstage.label(r)}" if role == "finalist" else f"seed {r['seed']}")
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=label,
                            line={"dash": dash})
    if not fig.data:
        raise ValueError("no final-stage run has finished an epoch yet")
    fig.update_layout(xaxis_title="epoch", yaxis_title=metric, height=420)
    return fig


def _final_section(final: dict, name: str) -> str:
    """The final stage's results: the line status prints, its notes, the finalists and the seeds."""
    esc = html.escape
    metric = final["metric"]

    def table(head: tuple, rows: list[tuple]) -> str:
        header = "".join(f"<th>{esc(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"

    def num(v, fmt="{:.4f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else ""

    chosen = final["chosen"]["number"] if final["chosen"] else None
    finalists = table(("trains", "search rank", "start", "state", f"{metric} (final budget)", "params",
                       "n_params", "seconds", "chosen"),
                      [(finalstage.label(f), f["rank"] or "-",
                        "yes" if f["baseline"] else "", f["state"].lower(), num(f["value"]),
                        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in f["params"].items()),
                        num(f["n_params"], "{:,}"), num(f["seconds"], "{:.0f}"), "yes" if f["number"] == chosen else "")
                       for f in final["finalists"]])
    seeds = table(("seed", "state", metric, "test acc", "seconds", "trained"),
                  [(r["seed"], r["state"].lower(), num(r["value"]), num(r["test_acc"], "{:.2%}"),
                    num(r["seconds"], "{:.0f}"), "reused the chosen finalist's run" if r["reused_from"] is not None
                    else "yes") for r in final["seeds"]])
    notes = "".join(f"<p class='note'>{esc(n)}</p>" for n in final["notes"])
    picks = ""
    if len(final["picks"]) > 1:  # the front after final training: one row per pick
        picks = ("<p>Each pick of <code>[final]</code>: its chosen network at the final budget, tested over seeds; "
                 f"<code>cnnsearch export {esc(name)} --pick RULE --model final.pt</code> writes its model. "
                 "The tables below are the first pick's.</p>"
                 + table(("pick", "search trial", "n_params", "test acc (mean)", "± std", "seeds tested"),
                         [(p["rule"], finalstage.label(p["chosen"]) if p["chosen"] else "-", num(p["n_params"], "{:,}"),
                           num(p["test_mean"], "{:.2%}"), num(p["test_std"], "{:.2%}"), p["tested"])
                          for p in final["picks"]]))
    return (f'<section id="final"><h2>Final stage</h2><p>{esc(finalstage.summary_line(final))}.</p>{notes}{picks}'
            f"<p>Finalists: the best search trials (and the study's start), each trained at the final budget "
            f"without reading the test split; the chosen one is the best on validation.</p>{finalists}"
            f"<p>The chosen config over seeds, the test split read once per seed; "
            f"<code>cnnsearch export {esc(name)} --model final.pt</code> writes the model of the seed best "
            f"on validation.</p>{seeds}</section>")


def _learned_only(t: optuna.trial.FrozenTrial, spec) -> optuna.trial.FrozenTrial:
    """A multi-objective trial as a single-objective one: its learned value, its `curve` as the
    intermediate values (Optuna refuses report in multi-objective studies)."""
    return optuna.trial.FrozenTrial(
        number=t.number, state=t.state, value=objectives.learned_value(t, spec.objectives), values=None,
        datetime_start=t.datetime_start, datetime_complete=t.datetime_complete, params=t.params,
        distributions=t.distributions, user_attrs=t.user_attrs, system_attrs=t.system_attrs,
        intermediate_values=dict(enumerate(t.user_attrs.get("curve") or [])), trial_id=trial_id(t))


def _pareto_section(study: optuna.Study, spec, trials: list) -> str:
    """The Pareto front of a multi-objective study: Optuna's plot (2 or 3 objectives) and a table."""
    from optuna import visualization as vis

    esc = html.escape
    names = [o.name for o in spec.objectives]
    front = objectives.pareto_front(trials, spec.objectives)
    infeasible = sum("infeasible" in t.user_attrs for t in trials)
    figure = ""
    if 2 <= len(names) <= 3:
        try:
            with _quiet():
                fig = vis.plot_pareto_front(study, target_names=names, constraints_func=(
                    (lambda t: t.user_attrs.get("constraints", [0.0] * len(spec.limits))) if spec.limits else None))
            figure = fig.to_html(full_html=False, include_plotlyjs=False, div_id="fig-pareto")
        except (ValueError, RuntimeError) as exc:
            figure = f"<p class='note'>not drawn: {esc(' '.join(str(exc).split()))}</p>"
    head = "".join(f"<th>{esc(h)}</th>" for h in ["trial", *names, "params"])
    rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in (
        t.number, *(f"{v:,.6g}" for v in t.values),
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items()))) + "</tr>"
        for t in front)
    return (f'<section id="pareto"><h2>Pareto front</h2><p>{len(front)} trials no other feasible trial beats in '
            f"every objective ({esc(', '.join(f'{o.name} ({o.direction})' for o in spec.objectives))}), best "
            f"{esc(spec.learned.name)} first; {infeasible} trials over a per-trial limit, not trained. "
            f"<code>cnnsearch export {esc(study.study_name)} --pick knee</code> (or --pick max_params=N, "
            f"--trial N) exports one. The rest of this page is about {esc(spec.learned.name)} alone.</p>"
            f"{figure}<table id='pareto-trials'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            "</section>")


def _page(study, spec, trials, top_trials, figures, notes, best, best_cfg, storage_label, final=None,
          pareto: str = "") -> str:
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
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}</p>", pareto]
    for name, (title, fig, caption) in figures.items():
        parts.append(f'<section id="{name}"><h2>{esc(title)}</h2>')
        if fig is None:
            parts.append(f"<p class='note'>{esc(notes[title])}</p>")
        else:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}"))
            parts.append(f"<p class='meta'>{esc(caption)}</p>" if caption else "")
        parts.append("</section>")
    if final is not None:
        parts.append(_final_section(final, study.study_name))
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


def _write_pngs(out: Path, view, lines_view, curves, best, importances, metric, figures, *,
                axes: list[str], panels: list[_Slice], caveat: str, final: dict | None = None) -> list[Path]:
    """The figures as PNG files, each sized for what it shows (slice plots grow by rows, parallel
    coordinates by axes, importances by bars) with no text under _MIN_FONT pt at 100 dpi."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter
    from optuna.visualization import matplotlib as mvis

    def curves_plot():
        fig, ax = plt.subplots(figsize=(8, 5))
        seen: set[str] = set()
        for t, group, color, dashed, width in _curve_lines(curves, best and best.number):
            steps = sorted(t.intermediate_values)
            ax.plot(steps, [t.intermediate_values[s] for s in steps], ":" if dashed else "-", color=color,
                    lw=width, label=None if group in seen else group)
            seen.add(group)
        ax.set(title="Intermediate values per epoch", xlabel="Optuna step (= epoch - 1)", ylabel=metric)
        ax.legend()
        return fig

    def importance_plot():
        fig, ax = plt.subplots(figsize=(8, 1.4 + 0.4 * len(importances)), layout="constrained")
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel("importance")
        ax.set_title("\n".join(textwrap.wrap(caveat, 70)), fontsize=_MIN_FONT + 1,
                     color="#a60" if "noise" in caveat else "#555", loc="left")
        fig.suptitle("Parameter importances (fANOVA)", fontsize="x-large", x=0.02, ha="left")
        return fig

    def history_plot():
        fig = mvis.plot_optimization_history(view, target_name=metric).figure
        fig.set_size_inches(8, 5)
        return fig

    def parallel_plot():
        ax = mvis.plot_parallel_coordinate(lines_view, params=axes, target_name=metric)
        names = [metric] + sorted(axes)  # optuna's axis order; it cuts the names at 17 characters
        if len(ax.get_xticks()) == len(names):
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", rotation_mode="anchor")
        ax.figure.set_size_inches(2.5 + 1.4 * len(names), 6)
        ax.figure.subplots_adjust(left=0.04, right=0.98)  # the colorbar sits in this span too
        for other in ax.figure.axes[1:]:  # each axis's values are written over the lines: keep them readable
            other.grid(False)
            for label in other.get_yticklabels():
                label.set_bbox({"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1})
        return ax.figure

    def slice_plot():
        rows, cols = _slice_grid(len(panels))
        fig, grid = plt.subplots(rows, cols, figsize=(1.5 + 3.6 * cols, 0.8 + 3.0 * rows), sharey=True,
                                 squeeze=False, layout="constrained")
        numbers = [n for p in panels for n in p.numbers]
        norm = matplotlib.colors.Normalize(min(numbers), max(numbers))
        for ax, p in zip(grid.ravel(), panels):
            dots = ax.scatter(p.xs, p.ys, c=p.numbers, cmap="Blues", norm=norm, s=40, edgecolors="grey",
                              linewidths=0.6)
            ax.set_xlabel(p.name)
            if p.log:  # labels at the decades only (at 1, 2, 5 x 10^k over a short span): they never overlap
                ax.set_xscale("log")
                short = max(p.xs) < 30 * min(p.xs)
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if short else (1.0,), numticks=6))
                ax.xaxis.set_minor_formatter(NullFormatter())
            if p.labels is not None:
                long = sum(len(label) for label in p.labels) > 24
                ax.set_xticks(range(len(p.labels)), [textwrap.shorten(label, 14, placeholder="…")
                                                     for label in p.labels],
                              rotation=25 if long else 0, ha="right" if long else "center")
                ax.set_xlim(-0.5, len(p.labels) - 0.5)
        for ax in grid[:, 0]:
            ax.set_ylabel(metric)
        for ax in grid.ravel()[len(panels):]:
            ax.set_visible(False)
        fig.colorbar(dots, ax=grid, label="trial", shrink=1.0 if rows == 1 else max(0.4, 1.6 / rows))
        fig.suptitle("Slice plots: completed trials, darker ones later", fontsize="x-large")
        return fig

    def final_plot():
        fig, ax = plt.subplots(figsize=(8, 5))
        for rows, style in ((final["finalists"], "--"), (final["seeds"], "-")):
            for r in rows:
                pts = [(h["epoch"] + 1, h[metric]) for h in r["history"] if metric in h]
                label = f"finalist: {finalstage.label(r)}" if r in final["finalists"] else f"seed {r['seed']}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", label=label)
        ax.set(title="Final stage: validation per epoch", xlabel="epoch", ylabel=metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        return fig

    makers = {"history": history_plot, "intermediate": curves_plot, "importances": importance_plot,
              "parallel": parallel_plot, "slice": slice_plot, "final-curves": final_plot}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    # optuna's plots switch to the ggplot style process-wide: keep that (and our font floor) to
    # these figures, not to the caller's later ones
    with matplotlib.rc_context():
        plt.style.use("ggplot")
        matplotlib.rcParams.update({"font.size": 10, "legend.fontsize": _MIN_FONT + 1})
        for name, (title, fig, _) in figures.items():
            if fig is None:
                continue
            with _quiet():
                figure = makers[name]()
            try:
                figure.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
            finally:
                plt.close(figure)
            written.append(out / f"{name}.png")
    return written


def write_report(name: str, path: str | Path, store: Store | str | None = None, *, top: int = 20,
                 png_dir: str | Path | None = None) -> Report:
    """Load study `name` and write its report to `path` (atomically); see `build_report`."""
    store = open_store(store, heartbeat_interval=None, create=False)
    study, spec = study_mod.load(name, store, validate=False)
    report = build_report(study, spec, url=store.url, top=top, png_dir=png_dir)
    write_atomic(path, lambda f: f.write(report.html.encode()))
    return report
