"""search.artifacts on S3 (`--artifacts s3://bucket/prefix`): real boto3 against a real S3 endpoint,
no mocks. The endpoint is $CNNSEARCH_TEST_S3 (CI starts a moto_server and sets it), else a
moto_server this module starts for the session where moto[server] is installed, else the tests
skip, saying how to run them. The other tests here (other schemes, a missing boto3, an
unwritable directory at create time) need no endpoint.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from search import artifacts
from search.artifacts import S3CheckpointStore, open_artifacts
from search.cli import app
from search.errors import CheckpointError, CnnsearchError
from search.worker import run_worker
from studykit import assert_one_line_error, quick_study, start_worker, stop_all
from test_trial_resume import FAST_HEARTBEAT, _study, check_retry, interrupt_at, reference, trials_of, wait_for_checkpointed_trial

S3_ENV = "CNNSEARCH_TEST_S3"
runner = CliRunner()


def cli(*args, **kwargs):
    return runner.invoke(app, list(args), **kwargs)


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint, timeout=1):
            return True
    except OSError as exc:  # an HTTP error status is an answer too
        return hasattr(exc, "code")


@pytest.fixture(scope="session")
def s3_endpoint():
    """The URL of an S3 endpoint: $CNNSEARCH_TEST_S3, else a moto_server started here."""
    given = os.environ.get(S3_ENV)
    if given:
        yield given.rstrip("/")
        return
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.skip(f"set {S3_ENV}=http://127.0.0.1:PORT (a moto_server or MinIO), or pip install 'moto[server]' "
                    "so that these tests start one, to run the S3 artifact tests (CI sets it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _answers(endpoint):
            assert server.poll() is None, f"moto_server exited with {server.returncode}"
            assert time.monotonic() < deadline, f"moto_server did not answer on {endpoint} within 60 s"
            time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch, tmp_path):
    """boto3 pointed at the endpoint through its standard variables only (as a user would), with
    dummy credentials and no ~/.aws; exported, so worker subprocesses see them too."""
    for name, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ENDPOINT_URL_S3": s3_endpoint,
                        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", artifacts.ARTIFACTS_ENV):
        monkeypatch.delenv(name, raising=False)
    return s3_endpoint


@pytest.fixture
def bucket(s3_env):
    """A fresh bucket, created with boto3; its name."""
    import boto3

    name = f"cnnsearch-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def keys(bucket: str) -> list[str]:
    import boto3

    return sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", []))


def _tiny_state():
    from search import datasets, engine
    from search.config import RunConfig

    cfg = RunConfig(dataset="digits", epochs=1, device="cpu", model_params={"channels": [4], "fc": []})
    return engine.TrainState.start(cfg, datasets.dataset_for(cfg))


# --- the store: round trips ----------------------------------------------------------------------

def test_save_load_put_get_usage_remove_round_trip_under_the_prefix(bucket):
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key="elsewhere.pt", Body=b"not ours")  # outside the prefix
    store = open_artifacts("postgresql+psycopg://u@h/db", f"s3://{bucket}/runs/a/", probe=True)
    assert isinstance(store, S3CheckpointStore)
    assert store.shown == store.where == f"s3://{bucket}/runs/a"
    assert keys(bucket) == ["elsewhere.pt"]  # the probe left nothing

    first = store.save(_tiny_state(), {"trial": 3}, prefix="s-trial3-")
    second = store.save(_tiny_state(), {"trial": 4}, prefix="s-trial4-")
    model = store.put_bytes(b"weights" * 100, "s-final/model.pt")
    assert model == "s-final/model.pt" and first.startswith("s-trial3-") and first.endswith(".pt")
    assert keys(bucket) == sorted(["elsewhere.pt", f"runs/a/{first}", f"runs/a/{second}", "runs/a/s-final/model.pt"])

    doc = store.load(first, "trial 3's checkpoint")
    assert doc["trial"] == 3 and doc["state"]["progress"]["epoch"] == 0
    assert store.get_bytes(model, "the model") == b"weights" * 100
    sizes = {i: len(store.get_bytes(i, "it")) for i in (first, second, model)}
    assert store.usage("s-trial3-") == (1, sizes[first])
    assert store.usage() == store.usage("s-") == (3, sum(sizes.values())) and sizes[model] == 700

    store.remove(first)
    store.remove(first)  # already gone: nothing to say
    with pytest.raises(CheckpointError) as info:
        store.load(first, "trial 3's checkpoint")
    assert str(info.value) == f"trial 3's checkpoint ({first}) is not in the artifact store s3://{bucket}/runs/a"
    store.remove_all("s-trial4-")
    assert store.usage() == (1, 700)
    store.remove_all("s-")
    assert store.usage() == (0, 0) and keys(bucket) == ["elsewhere.pt"]


def test_a_bucket_without_a_prefix_and_a_checkpoint_that_is_not_one(bucket):
    store = open_artifacts("sqlite:///x.db", f"s3://{bucket}")
    assert store.prefix == "" and store.shown == f"s3://{bucket}"
    store.put_bytes(b"half a checkpoint", "t-trial0-x.pt")
    assert keys(bucket) == ["t-trial0-x.pt"]
    with pytest.raises(CheckpointError) as info:
        store.load("t-trial0-x.pt", "trial 0's checkpoint")
    assert "trial 0's checkpoint" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError):
        store.put_bytes(b"x", "runs/.hidden")  # the store's own names
    store.remove_all("t-")
    assert keys(bucket) == []


def test_probe_of_a_missing_bucket_is_one_line(s3_env):
    store = open_artifacts("sqlite:///x.db", "s3://no-such-bucket-cnnsearch/p")  # opening contacts nothing
    with pytest.raises(CnnsearchError) as info:
        store.probe()
    message = str(info.value)
    assert message.startswith("artifact store s3://no-such-bucket-cnnsearch/p: cannot write (")
    assert "NoSuchBucket" in message and "\n" not in message


def test_writes_to_a_missing_bucket_are_oserrors_and_reads_checkpoint_errors(s3_env):
    """What a trial meets when the bucket goes away mid-run: a save is an OSError (the trial records
    checkpoint_error and trains on), a load a CheckpointError (the retry trains from scratch)."""
    store = open_artifacts("sqlite:///x.db", "s3://no-such-bucket-cnnsearch")
    with pytest.raises(OSError, match="NoSuchBucket"):
        store.put_bytes(b"x", "a.pt")
    with pytest.raises(CheckpointError):
        store.get_bytes("a.pt", "a")
    store.remove("a.pt")
    store.remove_all("a")  # nothing to list: left as it is
    with pytest.raises(CnnsearchError, match="cannot list it"):
        store.usage()


def test_probe_of_an_endpoint_that_does_not_answer_is_one_line_in_seconds(s3_env, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens here once this socket is closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed}")
    store = open_artifacts("sqlite:///x.db", "s3://b/p")
    started = time.monotonic()
    with pytest.raises(CnnsearchError) as info:
        store.probe()
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert message.startswith("artifact store s3://b/p: cannot write (") and "\n" not in message


# --- what needs no endpoint ----------------------------------------------------------------------

def test_other_url_schemes_are_one_line_naming_what_is_supported(tmp_path, monkeypatch):
    monkeypatch.delenv(artifacts.ARTIFACTS_ENV, raising=False)
    study = tmp_path / "tiny.toml"
    quick_study(tmp_path, run=False)
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    for scheme in ("gs://x", "http://minio:9000/bucket"):
        result = cli("create", str(study), "--storage", url, "--artifacts", scheme)
        assert_one_line_error(result, f"--artifacts {scheme!r}: only a directory (local or shared) or an "
                                      "s3://bucket/prefix URL")
    assert_one_line_error(cli("create", str(study), "--storage", url, "--artifacts", "s3://"), "no bucket")
    assert cli("list", "--storage", url).stdout.strip() == "no studies"


def test_an_s3_url_without_boto3_says_pip_install_boto3(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if not installed: import boto3 fails
    with pytest.raises(CnnsearchError) as info:
        open_artifacts("sqlite:///x.db", "s3://bucket/p")
    assert str(info.value) == "artifact store s3://bucket/p: needs boto3, which is not installed (pip install boto3)"


def test_create_with_an_artifact_directory_that_cannot_be_written_is_one_line_and_no_study(tmp_path, monkeypatch):
    monkeypatch.delenv(artifacts.ARTIFACTS_ENV, raising=False)
    quick_study(tmp_path, run=False)  # tiny.toml (and study.db, holding "tiny")
    study = tmp_path / "tiny.toml"
    url = f"sqlite:///{tmp_path / 'other.db'}"
    (tmp_path / "a-file").write_text("not a directory")
    under_a_file = tmp_path / "a-file" / "artifacts"
    result = cli("create", str(study), "--storage", url, "--artifacts", str(under_a_file))
    assert_one_line_error(result, f"artifact directory {under_a_file}: cannot create it")
    assert_one_line_error(cli("run", str(study), "--storage", url, "--device", "cpu", "-q",
                              "--artifacts", str(under_a_file)), "cannot create it")
    existing = f"sqlite:///{tmp_path / 'study.db'}"  # a worker needs its study first
    assert_one_line_error(cli("worker", "tiny", "--storage", existing, "--device", "cpu", "-q",
                              "--artifacts", str(under_a_file)), "cannot create it")
    assert cli("list", "--storage", url).stdout.strip() == "no studies"
    if os.geteuid() != 0:  # root writes into a read-only directory all the same
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        assert_one_line_error(cli("create", str(study), "--storage", url, "--artifacts", str(read_only)),
                              f"artifact directory {read_only}: cannot write (Permission denied)")
        assert cli("list", "--storage", url).stdout.strip() == "no studies"


def test_create_and_run_probe_the_s3_store_first(bucket, tmp_path):
    quick_study(tmp_path, run=False)
    study = tmp_path / "tiny.toml"
    url = f"sqlite:///{tmp_path / 'other.db'}"
    assert_one_line_error(cli("create", str(study), "--storage", url, "--artifacts", "s3://no-such-bucket-cnnsearch/c"),
                          "artifact store s3://no-such-bucket-cnnsearch/c: cannot write (")
    assert cli("list", "--storage", url).stdout.strip() == "no studies"
    done = cli("run", str(study), "--storage", url, "--device", "cpu", "-q", "--artifacts", f"s3://{bucket}/c")
    assert done.exit_code == 0, done.output
    assert keys(bucket) == []  # the probe's and every finished trial's checkpoint removed
    assert not (tmp_path / "other-artifacts").exists()  # nothing beside the database


# --- a retried trial resumes from its S3 checkpoint ---------------------------------------------

def test_an_interrupted_trial_resumes_from_its_s3_checkpoint(bucket, tmp_path):
    url, spec, local = _study(tmp_path)
    where = f"s3://{bucket}/ckpt"
    with pytest.raises(KeyboardInterrupt):
        run_worker("tiny", url, device="cpu", seed_offset=0, on_epoch=interrupt_at(4), artifacts=where)
    trials = trials_of(url)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert keys(bucket) == [f"ckpt/{trials[0].user_attrs[artifacts.CHECKPOINT_ATTR]}"]  # kept for the retry
    run_worker("tiny", url, device="cpu", seed_offset=0, artifacts=where)
    retry = check_retry(trials_of(url), 0, 5, reference(spec, trials[0].params))
    assert "resume_error" not in retry.user_attrs and "checkpoint_error" not in retry.user_attrs
    assert keys(bucket) == [] and not local.exists()


def test_a_killed_workers_trial_resumes_from_its_s3_checkpoint(bucket, tmp_path, monkeypatch):
    """The SIGKILL test of test_trial_resume.py with the checkpoints in S3: the victim is given
    --artifacts, the survivor $CNNSEARCH_ARTIFACTS."""
    url, spec, local = _study(tmp_path, 40)
    where = f"s3://{bucket}/ckpt"
    store = open_artifacts(url, where)
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    victim = start_worker("tiny", url, *FAST_HEARTBEAT, "--artifacts", where, log=logs[0])
    survivor = None
    try:
        running = [wait_for_checkpointed_trial(url, victim, logs[0], 180)]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        doomed = {t.number: t for t in trials_of(url)}[running[0].number]
        saved = store.load(doomed.user_attrs[artifacts.CHECKPOINT_ATTR], "the checkpoint")
        k = saved["state"]["progress"]["epoch"]
        assert 2 <= k <= len(doomed.intermediate_values) < 40
        monkeypatch.setenv(artifacts.ARTIFACTS_ENV, where)
        survivor = start_worker("tiny", url, *FAST_HEARTBEAT, log=logs[1])
        assert survivor.wait(timeout=300) == 0, logs[1].read_text()
    finally:
        stop_all((victim, survivor))
    retry = check_retry(trials_of(url), doomed.number, k, reference(spec, doomed.params, threads=1))
    assert "resume_error" not in retry.user_attrs
    assert store.usage() == (0, 0) and not local.exists()  # every checkpoint gone, none written locally
    print(f"[resume] S3: SIGKILL with {len(doomed.intermediate_values)} epochs reported, retry {retry.number} "
          f"resumed from epoch {k} in {where}")
