import pytest
from typer.testing import CliRunner

import search
from search.cli import app

from studykit import assert_one_line_error  # noqa: E402

runner = CliRunner()


def run(*args, **kwargs):
    return runner.invoke(app, list(args), **kwargs)


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and search.__version__ in result.stdout


def test_train_digits_prints_progress_and_accuracies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # train writes runs/<name>/ here
    result = run("train", "--set", "dataset=digits", "--set", "epochs=2", "--set", "batch_size=32",
                 "--set", 'model_params={"channels": [8, 16], "padding": 1, "fc": [32]}', "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "epoch   1/2" in result.stdout and "epoch   2/2" in result.stdout
    assert "test acc" in result.stdout and "best val acc" in result.stdout


def test_train_reads_a_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.toml"
    path.write_text('dataset = "synthetic"\nepochs = 1\nbatch_size = 16\ndevice = "cpu"\n'
                    '[data_options]\nn = 200\nclasses = 3\nsize = 8\nchannels = 1\n'
                    '[model_params]\nchannels = [4]\npadding = 1\nfc = [8]\n')
    result = run("train", str(path))
    assert result.exit_code == 0, result.output
    assert "epoch   1/1" in result.stdout


@pytest.mark.parametrize("args,fragment", [
    (["train", "missing.json"], "missing.json: no such file"),
    (["train", "--set", "learning_rate=0.1"], "unknown key 'learning_rate'"),
    (["train", "--set", "lr=fast"], "lr: expected float"),
    (["train", "--set", "epochs"], "expected key=value"),
    (["train", "--set", "model=resnet9000"], "resnet9000"),
    (["train", "--set", "dataset=imagenet"], "imagenet"),
    (["train", "--set", "dataset=mnist", "--data-dir", "/nonexistent/cnnsearch"], "/nonexistent/cnnsearch"),
    (["train", "--device", "cuda:7"], "cuda"),
    (["train", "--set", "weight_decay=Infinity"], "weight_decay: expected a finite number, got inf"),
    (["train", "--set", "lr=NaN"], "lr: expected a finite number, got nan"),
    (["train", "--set", "seed=-1"], "seed: must be in [0, 2**32), got -1"),
    (["train", "--set", "val_seed=4294967296"], "val_seed: must be in [0, 2**32)"),
])
def test_bad_input_is_one_line_and_exit_1(args, fragment):
    assert_one_line_error(run(*args), fragment)


def test_train_with_no_config_trains_the_defaults(tmp_path, monkeypatch):
    """The default RunConfig (the convnet on 8x8 digits) used to stop at "block 2 shrinks the 8x8 input"."""
    monkeypatch.chdir(tmp_path)
    result = run("train", "--set", "epochs=1")
    assert result.exit_code == 0, result.output
    assert "training convnet on digits" in result.stdout and "test acc" in result.stdout


def _pets(root):
    from PIL import Image

    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 100, 0)).save(root / name / f"{i}.png")


def test_create_with_a_missing_folder_is_one_line_and_creates_nothing(tmp_path):
    from studykit import QUICK_STUDY

    study = tmp_path / "pets.toml"
    study.write_text(QUICK_STUDY.format(name="pets", n_trials=1, n=200, description="pets").replace(
        'dataset = "synthetic"\ndata_options = { n = 200, classes = 3, size = 8, channels = 1 }',
        f'dataset = "folder"\ndata_options = {{ path = "{tmp_path / "pets"}", image_size = 8, '
        f'cache_dir = "{tmp_path / "cache"}" }}'))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert_one_line_error(run("create", str(study), "--storage", url),
                          f"image folder {tmp_path / 'pets'} does not exist")
    # Nothing written: no database file at all (list now refuses one), or one without studies.
    assert not (tmp_path / "s.db").exists() or run("list", "--storage", url).stdout.strip() == "no studies"
    _pets(tmp_path / "pets")
    result = run("create", str(study), "--storage", url)
    assert result.exit_code == 0 and "study 'pets' created" in result.stdout, result.output


def test_create_warns_in_one_line_when_the_data_is_not_here(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNSEARCH_DATA", str(tmp_path / "nodata"))
    study = tmp_path / "m.toml"
    study.write_text('[study]\nname = "m"\nn_trials = 2\n[data]\ndataset = "mnist"\n'
                     '[space.lr]\ntype = "float"\nlow = 1e-4\nhigh = 1e-1\nlog = true\n'
                     '[sampler]\nname = "RandomSampler"\n[pruner]\nname = "NopPruner"\n')  # no budget warnings
    result = run("create", str(study), "--storage", f"sqlite:///{tmp_path / 's.db'}")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"warning: mnist not found in {tmp_path / 'nodata'}") and \
        len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "study 'm' created" in result.stdout


def test_create_says_what_the_final_stage_will_do_in_words_that_agree(tmp_path):
    from pathlib import Path

    study = Path(__file__).resolve().parents[1] / "studies" / "digits_quick.toml"
    for n, words in ((1, "1 finalist and the start"), (2, "2 finalists and the start")):
        result = run("create", str(study), "--storage", f"sqlite:///{tmp_path / f'{n}.db'}",
                     "--set", f"final.finalists={n}")
        assert result.exit_code == 0, result.output
        assert f"then the final stage: {words} for" in result.stdout, result.stdout


def test_a_bug_is_a_traceback_with_a_hint_not_a_user_error(tmp_path, monkeypatch):
    """Only the project's own errors are shown as bad input; a KeyError or ValueError from
    inside the code is a bug, and hiding its traceback would hide where it is."""
    from search import study as study_mod

    def broken(*args, **kwargs):
        raise KeyError("cnnsearch_internal_key")

    monkeypatch.setattr(study_mod, "list_studies", broken)
    result = run("list", "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.exit_code == 70, result.output
    assert "Traceback" in result.output and "cnnsearch_internal_key" in result.output
    assert "a bug in cnnsearch, not in your input" in result.output
    assert "error: " not in result.output


def test_a_user_error_raised_anywhere_is_one_line(tmp_path, monkeypatch):
    from search import study as study_mod
    from search.errors import StudyError

    def refused(*args, **kwargs):
        raise StudyError("no study here\nsecond line never shown")

    monkeypatch.setattr(study_mod, "list_studies", refused)
    assert_one_line_error(run("list", "--storage", f"sqlite:///{tmp_path / 'x.db'}"), "no study here")


def test_each_command_opens_its_storage_once(tmp_path, monkeypatch):
    """One Store per command, passed down: a worker used to open the database three times."""
    from search import storage
    from studykit import quick_study

    url = quick_study(tmp_path, "tiny", n_trials=2, run=False)
    opened = []
    real = storage.open_storage
    monkeypatch.setattr(storage, "open_storage", lambda *a, **k: opened.append(a) or real(*a, **k))
    for args in (["worker", "tiny", "--device", "cpu", "-q"], ["status", "tiny"], ["best", "tiny"],
                 ["list"], ["export", "tiny", "-o", str(tmp_path / "best.json")],
                 ["report", "tiny", "-o", str(tmp_path / "r.html")]):
        opened.clear()
        result = run(*args, "--storage", url)
        assert result.exit_code == 0, result.output
        assert len(opened) == 1, f"{args[0]} opened the storage {len(opened)} times"


def test_run_quiet_prints_no_optuna_log_lines(tmp_path):
    """`run -q` is one line per trial; Optuna's own "A new study created" line is not one."""
    import subprocess
    import sys

    from studykit import QUICK_STUDY

    study = tmp_path / "q.toml"
    study.write_text(QUICK_STUDY.format(name="q", n_trials=1, n=200, description="quiet"))
    done = subprocess.run([sys.executable, "-m", "search.cli", "run", str(study), "-q", "--device", "cpu",
                           "--storage", f"sqlite:///{tmp_path / 'q.db'}"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "A new study created" not in done.stdout + done.stderr
    assert "trial    0 complete" in done.stdout


def _helps():
    """Every command's --help, and the app's own."""
    yield "cnnsearch", run("--help")
    for command in app.registered_commands:
        name = command.name or command.callback.__name__.rstrip("_")
        yield name, run(name, "--help")


def test_no_help_shows_a_flag_as_taking_a_value():
    """Flags (--quiet, --force, --help, ...) render as flags: this Typer labelled each one <bool>."""
    seen = 0
    for name, result in _helps():
        assert result.exit_code == 0, (name, result.output)
        assert "<bool>" not in result.stdout, (name, result.stdout)
        seen += 1
    assert seen == len(app.registered_commands) + 1 >= 13
    assert "--quiet" in run("run", "--help").stdout and "--force" in run("delete", "--help").stdout


def test_train_run_and_worker_take_threads_with_the_same_help():
    import typer

    group = typer.main.get_command(app)
    options = [{p.name: p for p in group.commands[name].params}["threads"] for name in ("train", "run", "worker")]
    assert {(o.opts[0], o.help, o.envvar) for o in options} == {
        ("--threads", options[0].help, "CNNSEARCH_THREADS")}
    assert "torch CPU threads" in options[0].help


def test_train_threads_and_epochs_counted_from_1(tmp_path, monkeypatch):
    """--threads sets torch's threads; every epoch people read counts from 1: the progress lines, the best
    epoch, curves.png's axis. (metrics.json keeps the data's 0-based "epoch", as Optuna's steps do.)"""
    import json

    import torch
    from matplotlib.figure import Figure

    monkeypatch.chdir(tmp_path)
    threads, before = [], torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.append(n))
    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k))[1])
    result = run("train", "--set", "dataset=synthetic", "--set", "epochs=3", "--set", "batch_size=16",
                 "--set", 'data_options={"n": 200, "classes": 3, "size": 8, "channels": 1}',
                 "--set", "warmup_epochs=5",
                 "--set", 'model_params={"channels": [4], "padding": 1, "fc": [8]}', "--device", "cpu",
                 "--threads", "1", "--out", str(tmp_path / "run"))
    assert torch.get_num_threads() == before
    assert result.exit_code == 0, result.output
    assert threads == [1]
    lines = [line.split()[:2] for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert lines == [["epoch", "1/3"], ["epoch", "2/3"], ["epoch", "3/3"]]
    (shown,) = [int(line.rsplit("(epoch ", 1)[1].rstrip(")")) for line in result.stdout.splitlines()
                if line.startswith("best val acc")]
    (metrics,) = json.loads((tmp_path / "run" / "metrics.json").read_text())["runs"]
    assert shown == metrics["best_epoch"] + 1 and 1 <= shown <= 3
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2]
    (curves,) = figures
    for ax in curves.axes:
        assert ax.get_xlabel() == "epoch" and list(ax.lines[0].get_xdata()) == [1, 2, 3]


# The data directory: --data-dir > CNNSEARCH_DATA > the config's or the study's data_dir > ./data,
# in every command that reads data. A missing-data error names the directory actually used.

def fake_mnist(root):
    """A tiny MNIST in torchvision's layout: the four gzipped IDX files under root/MNIST/raw,
    40 training and 20 test images of 28x28, every class in each."""
    import gzip
    import struct

    import torch

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("t10k", 20)):
        for kind, t in (("images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)),
                        ("labels-idx1-ubyte", (torch.arange(n) % 10).to(torch.uint8))):
            header = bytes([0, 0, 0x08, t.dim()]) + struct.pack(f">{t.dim()}I", *t.shape)
            (raw / f"{split}-{kind}.gz").write_bytes(gzip.compress(header + t.numpy().tobytes()))
    return root


MNIST_RUN = {"dataset": "mnist", "val_fraction": 0.25, "epochs": 1, "batch_size": 16, "device": "cpu",
             "warmup_epochs": 5, "model_params": {"channels": [4], "padding": 1, "fc": [8]}}
MNIST_STUDY = """
[study]
name = "m"
n_trials = 1
[data]
dataset = "mnist"
val_fraction = 0.25
{data_dir}
[fixed]
epochs = 1
batch_size = 16
device = "cpu"
warmup_epochs = 5
model_params = {{ channels = [4], padding = 1, fc = [8] }}
[space.lr]
type = "float"
low = 1e-3
high = 1e-2
log = true
[sampler]
name = "RandomSampler"
kwargs = {{ seed = 0 }}
"""
# (flag, environment, file): which of them are given, and the one that must win
DATA_DIR_LEVELS = [
    pytest.param(("flag", "env", "file"), "flag", id="flag beats environment and file"),
    pytest.param(("flag", None, "file"), "flag", id="flag beats file"),
    pytest.param((None, "env", "file"), "env", id="environment beats file"),
    pytest.param((None, None, "file"), "file", id="file beats default"),
    pytest.param((None, None, None), "data", id="default ./data"),
]


def _levels(tmp_path, given):
    """--data-dir arguments and the CliRunner environment for the (flag, env, file) given."""
    flag, env, _ = given
    return (["--data-dir", str(tmp_path / flag)] if flag else [],
            {"CNNSEARCH_DATA": str(tmp_path / env) if env else None})


@pytest.mark.parametrize("given,used", DATA_DIR_LEVELS)
def test_train_takes_the_data_dir_from_flag_then_environment_then_file_then_default(tmp_path, monkeypatch,
                                                                                    given, used):
    import json
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    file = given[2]
    (tmp_path / "c.json").write_text(json.dumps({**MNIST_RUN, **({"data_dir": str(tmp_path / file)} if file else {})}))
    flag, env = _levels(tmp_path, given)
    result = run("train", "c.json", *flag, env=env)
    assert_one_line_error(result, f"mnist not found in {Path.cwd() / used} (")


@pytest.mark.parametrize("command", ["run", "worker"])
@pytest.mark.parametrize("given,used", DATA_DIR_LEVELS)
def test_a_study_takes_the_data_dir_from_flag_then_environment_then_study_then_default(tmp_path, monkeypatch,
                                                                                       command, given, used):
    from pathlib import Path

    from search import study as study_mod

    monkeypatch.chdir(tmp_path)
    file = given[2]
    study = tmp_path / "m.toml"
    study.write_text(MNIST_STUDY.format(data_dir=f'data_dir = "{tmp_path / file}"' if file else ""))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert run("create", str(study), "--storage", url, env={"CNNSEARCH_DATA": None}).exit_code == 0
    flag, env = _levels(tmp_path, given)
    target = str(study) if command == "run" else "m"
    result = run(command, target, "--storage", url, "--device", "cpu", "--quiet", *flag, env=env)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    found = [line for line in lines if "not found in" in line]  # run: also create's warning
    assert found, result.stderr
    for line in found:  # about the same directory
        assert f"mnist not found in {Path.cwd() / used} (" in line, result.stderr
    stored = study_mod.load("m", url)[1].data.get("data_dir")
    assert stored == (str(tmp_path / file) if file else None)  # the machine's choice is not stored


def test_following_the_missing_data_hint_makes_train_work(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CNNSEARCH_DATA", raising=False)
    real = fake_mnist(tmp_path / "real")
    (tmp_path / "c.json").write_text(json.dumps({**MNIST_RUN, "data_dir": str(tmp_path / "elsewhere")}))
    result = run("train", "c.json", "--out", "r")
    assert_one_line_error(result, f"mnist not found in {tmp_path / 'elsewhere'}")
    assert "give --data-dir DIR" in result.stderr and "holds MNIST/" in result.stderr
    result = run("train", "c.json", "--data-dir", str(real), "--out", "r")
    assert result.exit_code == 0, result.output
    assert "data: 30 training images, 10 validation, 20 test" in result.stdout and "test acc" in result.stdout
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["config"]["data_dir"] == str(real)


def test_following_the_missing_data_hint_makes_a_worker_work_and_leaves_the_study_alone(tmp_path, monkeypatch):
    from search import study as study_mod

    monkeypatch.chdir(tmp_path)
    real = fake_mnist(tmp_path / "real")
    study = tmp_path / "m.toml"
    study.write_text(MNIST_STUDY.format(data_dir=f'data_dir = "{tmp_path / "elsewhere"}"'))
    url = f"sqlite:///{tmp_path / 's.db'}"
    no_env = {"CNNSEARCH_DATA": None}
    created = run("create", str(study), "--storage", url, env=no_env)
    assert created.exit_code == 0 and "--data-dir DIR" in created.stderr, created.output
    result = run("worker", "m", "--storage", url, "--device", "cpu", "--quiet", env=no_env)
    assert_one_line_error(result, f"mnist not found in {tmp_path / 'elsewhere'}")
    assert "give --data-dir DIR" in result.stderr
    result = run("worker", "m", "--storage", url, "--device", "cpu", "--quiet", "--data-dir", str(real), env=no_env)
    assert result.exit_code == 0, result.output
    assert "worker done: 1 trials run here" in result.stdout
    assert study_mod.load("m", url)[1].data["data_dir"] == str(tmp_path / "elsewhere")


def test_predict_takes_the_data_dir_from_its_flag_over_the_models_config(tmp_path, monkeypatch):
    import json
    import shutil

    from search import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CNNSEARCH_DATA", raising=False)
    (tmp_path / "c.json").write_text(json.dumps(MNIST_RUN))
    first = fake_mnist(tmp_path / "first")
    assert run("train", "c.json", "--data-dir", str(first), "--out", "r").exit_code == 0  # model.pt names first/
    moved = shutil.move(first, tmp_path / "moved")
    datasets.clear_cache()
    assert_one_line_error(run("predict", "r", "--dataset-test"), f"mnist not found in {first}")
    result = run("predict", "r", "--dataset-test", "--data-dir", str(moved),
                 env={"CNNSEARCH_DATA": str(tmp_path / "nothing")})
    assert result.exit_code == 0, result.output
    assert "mnist test split: accuracy" in result.stdout and "on 20 images" in result.stdout


def test_launch_hands_its_data_dir_to_every_worker(tmp_path, monkeypatch):
    from search import launch as launch_mod

    seen = {}

    def fake_launch(name, url, slots, *, worker_args=(), on_start=None):
        seen["args"] = list(worker_args)
        return [0 for _ in slots]

    monkeypatch.setattr(launch_mod, "launch", fake_launch)
    study = tmp_path / "m.toml"
    study.write_text(MNIST_STUDY.format(data_dir=""))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert run("create", str(study), "--storage", url).exit_code == 0
    result = run("launch", "m", "--storage", url, "--cpus", "2", "--log-dir", str(tmp_path / "logs"),
                 "--data-dir", str(tmp_path / "here"))
    assert result.exit_code == 0, result.output
    assert seen["args"][-2:] == ["--data-dir", str(tmp_path / "here")]


# --- read commands: never create storage, answer without loading torch (issue 18) ----------------

READ_COMMANDS = [["status", "s"], ["best", "s"], ["list"], ["report", "s"], ["export", "s"],
                 ["dashboard", "--port", "0"], ["delete", "s", "--yes"], ["worker", "s", "--device", "cpu", "-q"],
                 ["launch", "s", "--cpus", "1"]]


@pytest.mark.parametrize("args", READ_COMMANDS, ids=lambda args: args[0])
def test_a_read_command_without_a_database_says_where_it_looked_and_creates_nothing(tmp_path, monkeypatch, args):
    """They used to create an empty cnnsearch.db (SQLite makes the file on connecting, Optuna
    the tables) and then report no study."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CNNSEARCH_STORAGE", raising=False)
    monkeypatch.delenv("CNNSEARCH_STORAGE_FILE", raising=False)
    assert_one_line_error(run(*args), f"no database at {tmp_path / 'cnnsearch.db'} (sqlite:///cnnsearch.db); "
                                      "run cnnsearch create or run first, or pass --storage URL")
    assert list(tmp_path.iterdir()) == []


def test_a_worker_with_a_typo_in_its_storage_path_leaves_no_file(tmp_path):
    typo = tmp_path / "studies.db"
    assert_one_line_error(run("worker", "s", "--storage", f"sqlite:///{typo}", "--device", "cpu", "-q"),
                          f"no database at {typo}")
    assert not typo.exists()


from studykit import pg_url  # noqa: E402,F401 (fixture)


@pytest.mark.postgres
def test_status_on_an_empty_postgres_database_creates_no_tables(pg_url):
    import sqlalchemy

    from search.storage import mask_url

    assert_one_line_error(run("status", "s", "--storage", pg_url), f"no cnnsearch tables in {mask_url(pg_url)}; ")
    engine = sqlalchemy.create_engine(pg_url, poolclass=sqlalchemy.pool.NullPool)
    assert sqlalchemy.inspect(engine).get_table_names() == []
    engine.dispose()


HEAVY = ("torch", "plotly", "matplotlib", "optuna_dashboard", "sklearn")
PROBE = f"""
import sys
from search.cli import app
sys.argv = ["cnnsearch", *sys.argv[1:]]
try:
    app()
except SystemExit as exc:
    code = exc.code
print("imported:", sorted({{m.split(".")[0] for m in sys.modules if m.split(".")[0] in {set(HEAVY)!r}}}))
sys.exit(code)
"""


def test_status_best_and_list_load_no_torch_plotly_matplotlib_or_dashboard(tmp_path):
    """What keeps them at about a second (scripts/bench_cli.py measures it): the stored spec is
    rebuilt, not validated again with models built, and nothing of training, reports or the
    dashboard is imported. A new module-level import of one of these fails here."""
    import subprocess
    import sys

    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from studykit import quick_study

    url = quick_study(tmp_path, "tiny", n_trials=4, run=False)
    study = optuna.load_study(study_name="tiny", storage=url)
    dists = {"lr": FloatDistribution(3e-3, 3e-2, log=True), "optimizer": CategoricalDistribution(["adam", "adamw"])}
    for i, value in enumerate((0.5, 0.75)):
        study.add_trial(optuna.trial.create_trial(params={"lr": 1e-2, "optimizer": "adam"}, distributions=dists,
                                                  value=value, intermediate_values={0: value}))
    for args in (["status", "tiny"], ["best", "tiny"], ["list"]):
        done = subprocess.run([sys.executable, "-c", PROBE, *args, "--storage", url], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines()[-1] == "imported: []", f"cnnsearch {args[0]}: {done.stdout}"
        assert "0.7500" in done.stdout
