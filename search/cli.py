"""cnnsearch command line: thin commands, parse -> one library call -> print.

User errors (`search.errors.CnnsearchError`: bad files, keys, values, names) are one line on
stderr and exit code 1. Anything else is a bug: its traceback is shown, with a line saying so.
Each command opens its storage once (`search.storage.open_store`) and passes the Store down.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup, TyperOption

import search
from search.errors import CnnsearchError, StudyGone, first_line


def _plain_flags(params: list) -> list:
    """Flags (--quiet, --help, ...) show no type: this Typer labels every option with its type,
    a flag as <bool>, as if it took a value."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


class _App(typer.Typer):
    """Every command of this app is a _Command (flags shown as flags)."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(help="Hyperparameter search for CNN image classifiers.", no_args_is_help=True, cls=_Group,
           add_completion=False, pretty_exceptions_enable=False)
# soft_wrap: lines in worker logs stay whole instead of folding at 80 columns.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class UserError(CnnsearchError):
    """A mistake in the command line itself (options that contradict each other)."""


BUG_EXIT = 70  # EX_SOFTWARE: not the user's input, a bug


def user_errors(fn: Callable) -> Callable:
    """A CnnsearchError becomes one line on stderr and exit 1, never a traceback. Any other
    exception is a bug, not bad input: its traceback, a line saying so, and exit 70."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CnnsearchError as exc:
            err.print(f"error: {first_line(exc)}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # the command's own exit code, a declined prompt, a usage error: Typer's to show
        except Exception:
            traceback.print_exc()
            err.print(f"cnnsearch {search.__version__} failed with the error above: a bug in cnnsearch, not in "
                      "your input. Please report it with the traceback and the command you ran.", markup=False)
            raise typer.Exit(BUG_EXIT) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"cnnsearch {search.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Hyperparameter search for CNN image classifiers: studies as files, workers on a shared database."""


SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a setting: key=value "
                                                      "(JSON values; dotted keys reach into model_params).")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", envvar="CNNSEARCH_DATA",
                                                   help="Where datasets live: this, else $CNNSEARCH_DATA, else the "
                                                   "config's data_dir, else ./data.")]
StudyDataDirOpt = Annotated[Optional[str], typer.Option(
    "--data-dir", envvar="CNNSEARCH_DATA", help="Where datasets live on this machine: this, else $CNNSEARCH_DATA, "
    "else the study's data.data_dir, else ./data. For this command only: the stored study keeps its own.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, envvar="CNNSEARCH_THREADS", help="torch CPU threads for "
                                                   "this process (torch.set_num_threads; default: PyTorch's choice).")]


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _epoch_line(epoch: int, total: int, m: dict) -> str:
    val = f"  val {m['val_acc']:.2%} (loss {m['val_loss']:.4f})" if "val_acc" in m else ""
    return (f"epoch {epoch + 1:>3}/{total}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2%}"
            f"{val}  lr {m['lr']:.2e}  {m['seconds']:.1f}s ({m['samples_per_s']:.0f} img/s)")


@app.command()
@user_errors
def train(
    config_file: Annotated[Optional[Path], typer.Argument(help="RunConfig as JSON/TOML (an exported "
                                                          "best.json works unchanged).")] = None,
    set_: SetOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="Override the number of epochs.")] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    full_train: Annotated[bool, typer.Option("--full-train", help="Train on train + validation.")] = False,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="Runs with seeds seed, seed+1, ...; test accuracy is "
                                                 "reported as mean ± std over them (default 1).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for model.pt, metrics.json, "
                                                    "curves.png (default runs/<config stem>-<time>).")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Also write model.onnx, checked against PyTorch "
                                       "(needs onnx and onnxruntime).")] = False,
    no_test: Annotated[bool, typer.Option("--no-test", help="Do not read the test split: compare finalists "
                                          "on validation, then test only the one chosen.")] = False,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        min=0, help="Save <out>/checkpoint.pt every N epochs (default 1; 0: never); deleted when the run "
        "has finished.")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue the interrupted run in this folder from its checkpoint.pt, with its own "
        "config and options (only --device, --threads, --data-dir, --checkpoint-every may be given).")] = None,
) -> None:
    """Train one configuration and report validation and test accuracy (the test set is read once, at the end)."""
    from search import config, datasets
    from search import final

    _set_threads(threads)
    saved = None
    if resume is not None:
        given = [name for name, value in (("CONFIG_FILE", config_file), ("--set", set_), ("--epochs", epochs),
                                          ("--full-train", full_train), ("--seeds", seeds), ("--out", out_dir),
                                          ("--onnx", onnx), ("--no-test", no_test)) if value]
        if given:
            raise CnnsearchError(f"--resume continues the run as it was saved: {', '.join(given)} cannot be given "
                              "with it (only --device, --threads, --data-dir, --checkpoint-every)")
        point = final.resume_point(resume)  # CheckpointError: none there, or unreadable
        cfg, out_dir, saved = point.cfg, resume, point.saved
        cfg = cfg.replace(device=device) if device else cfg
        seeds, full_train, onnx, no_test = point.seeds, point.full_train, point.onnx, not point.test
        checkpoint_every = point.checkpoint_every if checkpoint_every is None else checkpoint_every
    else:
        overrides = list(set_ or [])
        overrides += [f"epochs={epochs}"] if epochs is not None else []
        overrides += [f"device={device}"] if device else []
        cfg = config.load(config_file, overrides)
        seeds = seeds or 1
    chosen = datasets.choose_data_dir(data_dir, cfg.data_dir)  # --data-dir > $CNNSEARCH_DATA > the file's
    if chosen != cfg.data_dir:
        cfg = cfg.replace(data_dir=chosen)
    out_dir = out_dir or final.default_run_dir(config_file)
    if resume is not None:
        out.print(f"resuming {resume}: seed {point.seed}, {point.epoch} of {cfg.epochs} epochs done", markup=False)
    out.print(f"training {cfg.model} on {cfg.dataset} for {cfg.epochs} epochs "
              f"({cfg.optimizer}, lr {cfg.lr:g}, batch {cfg.batch_size}, device {cfg.device})"
              + (f", {seeds} seeds" if seeds > 1 else "") + (", on train + validation" if full_train else ""))
    ds = datasets.dataset_for(cfg)  # loaded once per process: train_final reuses it
    if ds.skipped_line:
        err.print(f"warning: {ds.skipped_line}", markup=False)
    subset = f" (subset {cfg.subset}; --set subset=null trains on all)" if cfg.subset is not None else ""
    out.print(f"data: {len(ds.train_y):,} training images{subset}, {len(ds.val_y):,} validation, "
              f"{len(ds.test_y):,} test", markup=False)

    def on_epoch(seed: int, epoch: int, m: dict) -> None:
        if seeds > 1 and epoch == 0:
            out.print(f"seed {seed}")
        out.print(_epoch_line(epoch, cfg.epochs, m))

    result = final.train_final(cfg, out_dir, seeds=seeds, full_train=full_train, onnx=onnx, test=not no_test,
                               on_epoch=on_epoch, resume=saved,
                               checkpoint_every=1 if checkpoint_every is None else checkpoint_every)
    for run in result.runs:
        who = f"seed {run['seed']}: " if seeds > 1 else ""
        if run["stop_reason"] != "finished":
            out.print(_epoch_line(len(run["history"]) - 1, cfg.epochs, run["history"][-1]))
            out.print(f"{who}stopped: {run['stop_reason']}")
        if run["best_epoch"] is not None:
            out.print(f"{who}best val acc {run['best_val_acc']:.2%} (epoch {run['best_epoch'] + 1})")
        if run["final_val_acc"] is not None:
            out.print(f"{who}last-epoch val acc {run['final_val_acc']:.2%}")
        tested = f"test acc {run['test_acc']:.2%}  test loss {run['test_loss']:.4f}  " if not no_test else ""
        out.print(f"{who}{tested}params {run['n_params']:,}  device {run['device']} ({run['precision']}{', CUDA graphs' if run.get('cuda_graph') else ''})")
    if result.test_std is not None:
        out.print(f"test acc {result.test_mean:.2%} ± {100 * result.test_std:.2f} points (mean ± std over "
                  f"{seeds} seeds)")
    noise = result.sampling_std()
    if noise is not None:
        out.print(f"on {result.test_images:,} test images one run's accuracy has a sampling std of "
                  f"{100 * noise:.2f} points: smaller differences between single runs are noise")
    if seeds > 1:
        out.print(f"model.pt holds seed {result.model_seed}'s model (best last-epoch validation accuracy)"
                  if not full_train else f"model.pt holds seed {result.model_seed}'s model (the first; "
                  "--full-train leaves no validation to choose by)")
    out.print(f"wrote {', '.join(str(f) for f in result.files)}", markup=False)


StudySetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override the study file: section.key=value, e.g. study.n_trials=12, "
    "data.subset=10000, fixed.epochs=4, enqueue[0].step_size=4 (a start's key; null removes it) (JSON values).")]
StorageOpt = Annotated[Optional[str], typer.Option("--storage", envvar="CNNSEARCH_STORAGE",
                                                  help="Database URL (default: $CNNSEARCH_STORAGE, else the "
                                                  "one line of the mode-0600 file named by $CNNSEARCH_STORAGE_FILE, "
                                                  "else sqlite:///cnnsearch.db). A URL with a password belongs in "
                                                  "one of those, not on a command line: ps shows it to everyone.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="One line per trial instead of progress bars.")]
HeartbeatOpt = Annotated[Optional[int], typer.Option(
    min=1, envvar="CNNSEARCH_HEARTBEAT", help="Seconds between a running trial's heartbeats (default 10).")]
GraceOpt = Annotated[Optional[int], typer.Option(
    min=1, envvar="CNNSEARCH_GRACE", help="Seconds without a heartbeat after which a running trial "
    "counts as dead: failed and retried once (default 60).")]
ArtifactsOpt = Annotated[Optional[str], typer.Option(
    "--artifacts", envvar="CNNSEARCH_ARTIFACTS", help="Directory (local or shared) or s3://bucket/prefix "
    "(AWS S3, MinIO: endpoint and credentials from boto3's AWS_* variables or ~/.aws) for trial checkpoints, "
    "saved every epoch so that a retried trial resumes (default: <db stem>-artifacts beside a SQLite "
    "database; none for other storage; 'none': off). Checked writable before the first trial.")]


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _trial_line(study, trial) -> str:
    from search.storage import count_trials

    done = count_trials(study, ("COMPLETE", "PRUNED"))
    value = " ".join(f"{v:.4g}" if len(trial.values) > 1 else f"{v:.4f}" for v in trial.values) if trial.values else "-"
    why = trial.user_attrs.get("error") or trial.user_attrs.get("stop_reason", "")
    job = _job_name(trial.user_attrs)
    if job:  # a final-stage job (search/finalstage.py)
        test = trial.user_attrs.get("test_acc")
        tested = f", test acc {test:.2%}" if test is not None else ""
        return f"final {job} {trial.state.name.lower():<8} val {value}{tested}  {why}"
    return f"trial {trial.number:>4} {trial.state.name.lower():<8} value {value}  {why}  [{done} finished]"


def _job_name(attrs: dict) -> str:
    """'finalist 2 (search trial 8)', 'seed 1 of trial 8', or '' for a search trial."""
    job = str(attrs.get("job") or "")  # a trial's user attrs, or a row of finalstage.results
    role, source = attrs.get("role") or job.partition(":")[0], attrs.get("source_trial")
    from search.finalstage import label

    of = label(attrs)
    if role == "finalist":
        return f"finalist ({of}{', the start' if attrs.get('baseline') and source is not None else ''})"
    if role == "seed":
        return f"seed {attrs.get('seed_index', job.partition(':')[2] or 0)} of {of}"
    return ""


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM held back while the block (an import of torch) runs, and delivered when
    it ends, where Python can raise them: a KeyboardInterrupt raised inside torch's C++ module
    set-up aborts the process (SIGABRT and a core dump, seen with Ctrl-C ~1 s into a worker)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stops_on_signals(fn: Callable) -> Callable:
    """`fn` under the worker's signal handlers from its first line (`search.worker.stop_on_signals`):
    a signal while it opens the storage and loads the study stops it too, even where its
    KeyboardInterrupt is lost in a finalizer. (Imported late: the worker module loads torch.)"""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _signals_held():
            from search.worker import stop_on_signals
        with stop_on_signals():
            return fn(*args, **kwargs)

    return wrapper


@_stops_on_signals
def _work(name: str, storage, device: str, quiet: bool, worker_index: Optional[int],
          threads: Optional[int], heartbeat: Optional[int] = None, grace: Optional[int] = None,
          reconnect_for: Optional[float] = None, data_dir: Optional[str] = None,
          artifacts: Optional[str] = None) -> None:
    """One worker in this process, with progress bars (or plain lines when quiet); `data_dir`
    (--data-dir or $CNNSEARCH_DATA) overrides the stored spec's data_dir for this worker only."""
    import optuna
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from search import study as study_mod
    from search.artifacts import open_artifacts
    from search.engine import resolve_device
    from search.storage import count_trials, open_store
    from search.worker import RECONNECT_FOR, claim_worker_index, run_worker, sampler_seed

    _set_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    resolve_device(device)  # before the banner: a bad device is the only line
    beats = {k: v for k, v in (("heartbeat_interval", heartbeat), ("grace_period", grace)) if v}
    store = open_store(storage, create=False, **beats)  # `run` passes the Store it created
    study, spec = study_mod.load(name, store)
    checkpoints = open_artifacts(store.url, artifacts, probe=True)  # None: off; unwritable: one line
    worker_index = claim_worker_index(study, worker_index)  # None: the next one no worker has used
    seed = sampler_seed(spec, worker_index)
    out.print(f"worker for {name!r} on {store.shown}, device {device}, budget {spec.n_trials} trials; "
              f"worker index {worker_index}, sampler seed {'none' if seed is None else seed}")
    limit = RECONNECT_FOR if reconnect_for is None else reconnect_for
    resilience = {"reconnect_for": limit,  # "none" stays off: None would mean the default store again
                  "artifacts": checkpoints if checkpoints is not None else (artifacts or "none"),
                  "on_outage": lambda why, waited: err.print(
                      f"storage unreachable ({why}); reconnecting, {waited:.0f}/{limit:.0f} s waited", markup=False)}
    if quiet:
        result = run_worker(name, store, device=device, worker_index=worker_index, data_dir=data_dir, **resilience,
                            on_trial=lambda s, t: out.print(_trial_line(s, t), markup=False))
    else:
        epochs = spec.fixed.get("epochs", 10)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=out) as bars:
            trials_bar = bars.add_task("trials", total=spec.n_trials, info="")
            epoch_bar = bars.add_task("epochs", total=epochs, info="")

            def on_epoch(number, epoch, m):
                total = max(epochs, epoch + 1)
                bars.update(epoch_bar, description=f"trial {number}", completed=epoch + 1, total=total,
                            info=f"val acc {m['val_acc']:.2%}" if "val_acc" in m else "")

            def on_trial(study, trial):
                bars.console.print(_trial_line(study, trial), markup=False)
                if "job" not in trial.user_attrs:  # a search trial, not a final-stage job
                    bars.update(trials_bar, completed=count_trials(study, ("COMPLETE", "PRUNED")))
                bars.update(epoch_bar, completed=0)

            result = run_worker(name, store, device=device, worker_index=worker_index, data_dir=data_dir,
                                **resilience, on_trial=on_trial, on_epoch=on_epoch)
    out.print(f"worker done: {result.trials_run} trials run here; stopped: {result.stopped_because}")
    _print_best(study_mod.summary(name, store))


def _stopping(exc: CnnsearchError) -> None:
    """A worker whose study was deleted (or replaced) under it: one line, exit 0. A deliberate
    stop like the budget, so that a scheduler does not restart it (docs/many-machines.md)."""
    out.print(f"worker stopping: {exc}", markup=False)


def _print_best(info: dict) -> None:
    best = info["best"]
    if info.get("front") is not None:
        _print_front(info) if info["front"] else out.print("no feasible completed trial yet")
    elif best is None:
        out.print("no finished trial yet")
    else:
        out.print(f"best trial {best['number']}: {info['spec'].metric} {best['value']:.4f}")
        out.print(f"  params: {_fmt_params(best['params'])}", markup=False)
    if info.get("infeasible"):
        out.print(f"{info['infeasible']} infeasible trial{'s' if info['infeasible'] != 1 else ''} (over a per-trial "
                  "limit, not trained)", markup=False)
    _print_final(info.get("final"))


def _print_front(info: dict) -> None:
    """A multi-objective study's Pareto front: one row a trial, best learned value first."""
    names = [o.name for o in info["spec"].objectives]
    rows = [[str(r["number"])] + [_fmt_metric(n, r["values"][n]) for n in names] for r in info["front"]]
    head = ["trial"] + names
    widths = [max(len(c) for c in column) for column in zip(head, *rows)]
    out.print(f"Pareto front: {len(rows)} trial{'s' if len(rows) != 1 else ''} (cnnsearch export "
              f"{info['name']} --pick knee | --pick max_params=N | --trial N)", markup=False)
    for row in [head] + rows:
        out.print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)), markup=False)


def _fmt_metric(name: str, value: float) -> str:
    if name == "val_acc":
        return f"{value:.2%}"
    if name in ("n_params", "macs"):
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _print_final(final: Optional[dict]) -> None:
    """The final stage's line (search/finalstage.py), with its notes; nothing without one."""
    from search.finalstage import pick_lines, summary_line

    if final is None:
        return
    out.print(summary_line(final), markup=False)
    for line in pick_lines(final):
        out.print(f"  {line}", markup=False)
    for note in final["notes"]:
        out.print(f"  note: {note}", markup=False)
    name = final["study"][:-len(".final")]
    if final["done"] and final["model"]:
        out.print(f"  the final model: cnnsearch export {name} --model final.pt", markup=False)
    others = [p["rule"] for p in final["picks"][1:] if p["model"]] if final["done"] else []
    if others:
        out.print(f"  another pick's: cnnsearch export {name} --pick {others[0]} --model final.pt "
                  f"(picks: {', '.join(others)})", markup=False)


@app.command()
@user_errors
def create(
    study_file: Annotated[Path, typer.Argument(help="Study file (TOML), e.g. studies/digits_quick.toml.")],
    storage: StorageOpt = None,
    set_: StudySetOpt = None,
    replace: Annotated[bool, typer.Option("--replace", help="Delete an existing study of this name "
                                          "(and its trials) when its spec differs.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --replace: delete even while workers run "
                                        "trials of the old study (they stop with one line).")] = False,
    data_dir: StudyDataDirOpt = None,
    artifacts: ArtifactsOpt = None,
) -> None:
    """Validate a study file and create the study in storage (idempotent for the same file)."""
    import optuna

    from search import spec as spec_mod
    from search import study as study_mod
    from search.artifacts import open_artifacts
    from search.storage import open_store

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this command prints its own line
    if force and not replace:
        raise UserError("--force goes with --replace")
    spec = spec_mod.load_spec(study_file, set_, data_dir=data_dir)
    store = open_store(storage, heartbeat_interval=None)
    open_artifacts(store.url, artifacts, probe=True)  # a store its workers cannot write: one line, no study
    made = study_mod.create(spec, store, replace=replace, force=force, data_dir=data_dir)
    for line in made.warnings:
        err.print(f"warning: {line}", markup=False)
    verb = "created" if made.created else "already exists (same spec)"
    out.print(f"study {spec.name!r} {verb} in {store.shown}: budget {spec.n_trials} "
              f"trials, {len(spec.space)} parameters, {len(spec.enqueue)} enqueued", markup=False)
    if spec.final is not None:
        f = spec.final
        epochs = f.epochs or spec.fixed.get("epochs", "the trials'")
        n_starts = len(spec.starts)
        start = (" and the start" if n_starts == 1 else f" and the {n_starts} starts") if n_starts else ""
        start += " if no larger" if n_starts and f.picks else ""
        if f.variants:  # twins of each search finalist (finalstage._with_twins)
            from search.finalstage import label

            withs = " and ".join(label({"variant": v}).removeprefix("the start ") for v in f.variants)
            start = (f" (and its twin {withs})" if f.finalists == 1 else f" (each also as a twin {withs})") + start
        picks = (f"for pick {f.pick}" if len(f.picks) == 1 else f"for each of {len(f.picks)} picks "
                 f"({', '.join(f.picks)})") + ": " if f.picks else ""
        out.print(f"  then the final stage: {picks}{f.finalists} finalist{'' if f.finalists == 1 else 's'}{start} for {epochs} epochs"
                  f"{' on all training images' if f.full_data else ''}, the best over {f.seeds} seeds", markup=False)


@app.command()
@user_errors
def run(
    study_file: Annotated[Path, typer.Argument(help="Study file (TOML).")],
    set_: StudySetOpt = None,
    storage: StorageOpt = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    quiet: QuietOpt = False,
    data_dir: StudyDataDirOpt = None,
    threads: ThreadsOpt = None,
    artifacts: ArtifactsOpt = None,
) -> None:
    """Create the study (if needed) and run one worker in this process: the quick start.

    Worker index: the next free one (see worker --help), 0 in a fresh database: a rerun there replays.
    """
    import optuna

    from search import spec as spec_mod
    from search import study as study_mod
    from search.artifacts import open_artifacts
    from search.storage import open_store

    with _signals_held():
        from search.worker import stop_on_signals
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created": the worker says it
    with stop_on_signals():  # from here, as in the worker: creating the study loads torch too
        spec = spec_mod.load_spec(study_file, set_, data_dir=data_dir)
        store = open_store(storage)  # a worker's: heartbeat on
        open_artifacts(store.url, artifacts, probe=True)  # as create does: one line, before the study
        for line in study_mod.create(spec, store, data_dir=data_dir).warnings:
            err.print(f"warning: {line}", markup=False)
        try:
            _work(spec.name, store, device, quiet, None, threads, data_dir=data_dir, artifacts=artifacts)
        except StudyGone as exc:
            _stopping(exc)


@app.command()
@user_errors
def worker(
    name: Annotated[str, typer.Argument(help="Study name.")],
    storage: StorageOpt = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    quiet: QuietOpt = False,
    worker_index: Annotated[Optional[int], typer.Option(
        "--worker-index", min=0, help="Added to the study's sampler seed, so that workers draw different trials; "
        "recorded with each trial (worker_index, sampler_seed), so that a study can be replayed. Default: the "
        "next index no worker of this study has taken, claimed atomically in the storage, so never shared by "
        "accident (0 in a fresh study). launch gives its workers 0..N-1. Formerly --seed-offset.")] = None,
    seed_offset: Annotated[Optional[int], typer.Option("--seed-offset", min=0, hidden=True)] = None,
    threads: ThreadsOpt = None,
    heartbeat: HeartbeatOpt = None,
    grace: GraceOpt = None,
    reconnect_for: Annotated[Optional[float], typer.Option(
        min=0, envvar="CNNSEARCH_RECONNECT_FOR", help="Seconds to keep retrying a lost database "
        "before giving up (default 60).")] = None,
    data_dir: StudyDataDirOpt = None,
    artifacts: ArtifactsOpt = None,
) -> None:
    """Pull trials of a study until its global budget is reached or its timeout passes."""
    try:
        if worker_index is None:
            worker_index = seed_offset
        _work(name, storage, device, quiet, worker_index, threads, heartbeat, grace, reconnect_for, data_dir,
              artifacts)
    except StudyGone as exc:
        _stopping(exc)


@app.command()
@user_errors
def launch(
    name: Annotated[str, typer.Argument(help="Study name.")],
    storage: StorageOpt = None,
    gpus: Annotated[Optional[str], typer.Option(help="all | 0,1,... : one worker per GPU slot.")] = None,
    per_gpu: Annotated[int, typer.Option(min=1, help="Workers per GPU.")] = 1,
    cpus: Annotated[Optional[int], typer.Option(min=1, help="CPU workers sharing the cores "
                                                "(when there is no GPU); the ones training take the "
                                                "threads of the ones waiting.")] = None,
    log_dir: Annotated[Path, typer.Option(help="Where each worker's log goes.")] = Path("logs"),
    heartbeat: HeartbeatOpt = None,
    grace: GraceOpt = None,
    data_dir: StudyDataDirOpt = None,
) -> None:
    """Start one worker process per GPU slot (or --cpus N on a CPU machine) and wait for them."""
    from search import study as study_mod
    from search.launch import launch as launch_workers
    from search.launch import plan_slots
    from search.storage import open_store

    store = open_store(storage, heartbeat_interval=None, create=False)
    study_mod.load(name, store, validate=False)  # fail here, not in N log files
    slots = plan_slots(gpus, per_gpu, cpus if gpus is None else None, log_dir)
    extra = [*(["--heartbeat", str(heartbeat)] if heartbeat else []), *(["--grace", str(grace)] if grace else []),
             *(["--data-dir", data_dir] if data_dir else [])]  # each worker: this, over the study's data_dir
    codes = launch_workers(name, store.url, slots, worker_args=extra, on_start=lambda k, slot, pid: out.print(
        f"worker {k} (pid {pid}, {slot.device}, {slot.env.get('CUDA_VISIBLE_DEVICES') or 'no GPU'}) "
        f"-> {slot.log}"))
    out.print(f"workers exited with codes {codes}")
    _print_best(study_mod.summary(name, store))
    if any(codes):
        raise typer.Exit(1)


@app.command()
@user_errors
def status(name: Annotated[str, typer.Argument(help="Study name.")], storage: StorageOpt = None,
           artifacts: ArtifactsOpt = None,
           workers: Annotated[Optional[int], typer.Option(
               min=1, help="Workers to share what is left among in the pace line (default: the trials "
                           "running now, at least 1).")] = None) -> None:
    """Trials by state, the best so far, the final stage, what is running where, what is left at
    the measured pace, and disk use."""
    from search import pace
    from search import study as study_mod
    from search.storage import open_store

    store = open_store(storage, heartbeat_interval=None, create=False)
    info = study_mod.summary(name, store, workers)
    counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(info["counts"].items())) or "no trials"
    out.print(f"study {name}: {info['finished']}/{info['budget']} finished ({counts})")
    _print_best(info)
    for r in info["running"]:
        age = f"{r['age_s']:.0f}s" if r["age_s"] is not None else "?"
        index = r.get("worker_index")
        seed = r.get("sampler_seed")
        worker = f", worker {index} (sampler seed {'none' if seed is None else seed})" if index is not None else ""
        out.print(f"  running: trial {r['number']} on {r['host']} {r['device']}{worker}, {age} old, "
                  f"{r['epochs']} epochs reported", markup=False)
    final = info["final"]
    for r in final["finalists"] + final["seeds"] if final else []:
        if r["state"] == "RUNNING":
            out.print(f"  running: final {_job_name(r)} on {r['host']} {r['device']}, "
                      f"{r['epochs_done']} epochs done of {r['epochs']}", markup=False)
    if info["projection"] is not None:
        out.print(pace.line(info["projection"]), markup=False)
    _print_disk_use(name, store.url, artifacts)


def _print_disk_use(name: str, url: str, artifacts: Optional[str]) -> None:
    """The study's files in the artifact store: trial checkpoints and final-stage model files."""
    from search.artifacts import artifact_store_if_any
    from search.finalstage import child_name

    store = artifact_store_if_any(url, artifacts)
    if store is None:
        return
    count, size = (sum(x) for x in zip(store.usage(f"{name}-"), store.usage(f"{child_name(name)}-")))
    out.print(f"artifacts: {count} file{'s' if count != 1 else ''}, {size / 2**20:.1f} MiB in {store.shown}",
              markup=False)


@app.command("list")
@user_errors
def list_(storage: StorageOpt = None) -> None:
    """The studies in storage."""
    from search import study as study_mod

    rows = study_mod.list_studies(storage)
    if not rows:
        out.print("no studies")
    for r in rows:
        if r["front"] is not None:
            what = f"Pareto front {r['front']} trial{'s' if r['front'] != 1 else ''}"
        else:
            what = f"best {r['best']:.4f}" if r["best"] is not None else "best -"
        if r["final_of"] is not None:
            what += f"  (final stage of {r['final_of']})"
        out.print(f"{r['name']:<30} trials {r['n_trials']:>5}  {what}", markup=False)


@app.command()
@user_errors
def best(name: Annotated[str, typer.Argument(help="Study name.")], storage: StorageOpt = None) -> None:
    """The best trial's value, parameters and attributes."""
    from search import study as study_mod
    from search.objectives import learned_value
    from search.storage import open_store

    store = open_store(storage, heartbeat_interval=None, create=False)
    _, spec, trial = study_mod.best_trial(name, store)
    of = " (on the Pareto front, the best " + spec.metric + ")" if spec.multi else ""
    out.print(f"best trial {trial.number}{of}: {spec.metric} {learned_value(trial, spec.objectives):.4f}")
    for key, value in trial.params.items():
        out.print(f"  {key} = {value!r}", markup=False)
    for key in ("n_params", "macs", "latency_ms", "stop_reason", "device", "host", "epoch_seconds"):
        if key in trial.user_attrs:
            out.print(f"  [{key}] {trial.user_attrs[key]}", markup=False)
    _print_final(study_mod.summary(name, store)["final"])


@app.command()
@user_errors
def delete(
    name: Annotated[str, typer.Argument(help="Study name.")],
    storage: StorageOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete even while workers run trials of it "
                                        "(they stop with one line).")] = False,
) -> None:
    """Delete a study and all its trials (asks first; refused while its workers run, unless --force)."""
    from search import study as study_mod
    from search.storage import open_store

    store = open_store(storage, heartbeat_interval=None, create=False)
    info = study_mod.summary(name, store)
    if not force:
        study_mod.refuse_if_running(study_mod.load(name, store, validate=False)[0])  # before asking; delete checks again
    if not yes and not typer.confirm(f"delete study {name!r} and its {sum(info['counts'].values())} trials?"):
        out.print("kept")
        raise typer.Exit(1)
    study_mod.delete(name, store, force=force)  # checks that it is gone before we say so
    out.print(f"deleted study {name!r}")


@app.command("export")
@user_errors
def export_(
    name: Annotated[str, typer.Argument(help="Study name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write.")] = Path("best.json"),
    trial: Annotated[Optional[int], typer.Option(help="Export this completed trial instead of the best.")] = None,
    rank: Annotated[int, typer.Option(min=1, help="Export the N-th best completed trial (finalists).")] = 1,
    pick: Annotated[Optional[str], typer.Option(help="Multi-objective studies: the Pareto trial to export: "
                                                "knee, or a limit like max_params=300000 (also max_macs, "
                                                "max_latency_ms): the best learned value within it. One of "
                                                "the final stage's picks: that pick's final config (and --model).")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Also write the final stage's model "
                                                  "(a model.pt for `cnnsearch predict`) to this file.")] = None,
    storage: StorageOpt = None,
    artifacts: ArtifactsOpt = None,
) -> None:
    """Write the best config (the final stage's chosen one, at the final budget, once it has one) as a
    self-contained file that `cnnsearch train` accepts; with --model, the final model too."""
    from search import export as export_mod
    from search.storage import open_store

    if sum((trial is not None, rank != 1, pick is not None)) > 1:
        raise UserError("give --trial or --rank or --pick, not two of them")
    if model is not None and (trial is not None or rank != 1):
        raise UserError("--model writes the final stage's model; it does not go with --trial or --rank")
    storage = open_store(storage, heartbeat_interval=None, create=False)  # once, for both files
    if model is not None:  # first: nothing is written when the model cannot be
        final = export_mod.export_model(name, model, storage, artifacts, pick)
        out.print(f"wrote {model}: the final model of study {name!r} "
                  f"({_final_short(final)}); classify with: cnnsearch predict {model} IMAGE...", markup=False)
    doc = export_mod.export_best(name, output, storage, trial, rank, pick)
    prov = doc["provenance"]
    if "final" in prov:
        from search.finalstage import label

        chosen = prov["final"]["chosen_finalist"]  # what it trained: a twin's variant, the start, a search trial
        of = ("search " if chosen["source_trial"] is not None else "") + label(chosen)
        out.print(f"wrote {output}: study {name!r}, the final stage's chosen config ({of}) at the final budget, "
                  f"{doc['config']['epochs']} epochs; {_final_short(prov['final'])}", markup=False)
        out.print(f"  params: {_fmt_params(chosen['params'])}", markup=False)
        return
    values = ", ".join(f"{k} {_fmt_metric(k, v)}" for k, v in prov["values"].items()) if "values" in prov else None
    out.print(f"wrote {output}: study {name!r} trial {prov['trial']}, "
              + (values or f"{prov['metric']} {prov['value']:.4f}"), markup=False)
    out.print(f"  params: {_fmt_params(prov['params'])}", markup=False)
    carried, final_command = export_mod.search_budget(doc, output)
    out.print(f"  {carried} (cnnsearch train {output} alone repeats them)", markup=False)
    out.print(f"next, the final model for N epochs: {final_command}", markup=False)


def _final_short(final: dict) -> str:
    if final.get("test_mean") is None:
        return "not tested yet"
    std = f" ± {final['test_std']:.2%}" if final.get("test_std") is not None else ""
    return f"final test acc {final['test_mean']:.2%}{std}"


@app.command()
@user_errors
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A training output folder (or its model.pt).")],
    images: Annotated[Optional[list[Path]], typer.Argument(help="PNG/JPEG files to classify.")] = None,
    dataset_test: Annotated[bool, typer.Option("--dataset-test", help="Evaluate the config's dataset "
                                               "test split and print the accuracy.")] = False,
    data_dir: DataDirOpt = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "cpu",
) -> None:
    """Classify image files with a trained model (loaded safely: tensors and plain data only)."""
    from search import modelfile

    if not images and not dataset_test:
        raise UserError("give image files to classify, or --dataset-test")
    loaded = modelfile.load_model_file(run_dir, device)
    for p in modelfile.predict_images(loaded, images) if images else []:
        out.print(f"{p.path}: {p.label} (class {p.index}, p={p.probability:.3f})", markup=False)
    if dataset_test:
        acc, loss, n = modelfile.evaluate_model_file(loaded, data_dir)
        out.print(f"{loaded.config.dataset} test split: accuracy {acc:.2%}, loss {loss:.4f} on {n} images")


@app.command()
@user_errors
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback is reachable "
                                      "by others (no login).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8080,
) -> None:
    """optuna-dashboard on the same storage: live plots, trials with their attributes, study notes."""
    from search.dashboard import open_dashboard
    from search.storage import open_store

    store = open_store(storage, heartbeat_interval=None, create=False)
    dash = open_dashboard(store, host, port)
    if not dash.loopback:
        err.print(f"warning: listening on {host}, reachable from other machines; the dashboard has no "
                  "login and can edit notes and delete studies", markup=False)
    out.print(f"optuna-dashboard for {store.shown} at {dash.url} (Ctrl-C to stop)",
              markup=False)
    try:
        dash.serve_forever()
    except KeyboardInterrupt:
        out.print("dashboard stopped")


@app.command()
@user_errors
def report(
    name: Annotated[str, typer.Argument(help="Study name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    png: Annotated[Optional[Path], typer.Option(help="Also write the figures as PNG files here.")] = None,
    top: Annotated[int, typer.Option(min=1, help="Rows in the table of best trials.")] = 20,
    storage: StorageOpt = None,
) -> None:
    """One self-contained HTML file (plots, top trials, best config) to share; optional PNGs."""
    from search import report as report_mod

    made = report_mod.write_report(name, output, storage, top=top, png_dir=png)
    out.print(f"wrote {output}: {', '.join(made.figures)}, top trials, best config", markup=False)
    for title, why in made.notes.items():
        out.print(f"  {title}: {why}", markup=False)
    if png:
        out.print(f"wrote {len(made.png_files)} PNG figures (matplotlib) to {png}", markup=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
