"""The Kubernetes and Slurm templates: well-formed, every `cnnsearch` command in them parses, and no
storage URL or password is on a command line (`ps` shows those to every user of a cluster node,
`kubectl get pod -o yaml` to everyone who may read pods) or written into a manifest."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer
import yaml
from typer.main import get_command

from search.cli import app

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MANIFESTS = sorted((SCRIPTS / "k8s").glob("*.yaml"))
SLURM = sorted((SCRIPTS / "slurm").glob("*.sh"))


def parse_cli(argv: list[str]) -> dict:
    """Parse `cnnsearch ARGS` with the real CLI's parser, without running the command."""
    group = get_command(app)
    ctx = group.make_context("cnnsearch", list(argv))
    name, command, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    return command.make_context(name, rest, parent=ctx).params


def placeholders(text: str) -> str:
    """${VAR:-default} -> default; $(VAR) (Kubernetes), ${VAR} and $VAR (shell) -> a plain word."""
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)
    return re.sub(r"\$\(\w+\)|\$\{[^}]*\}|\$\w+", "PLACEHOLDER", text)


def k8s_docs():
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def containers(doc):
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def k8s_commands():
    return [[placeholders(a) for a in c.get("command", []) + c.get("args", [])]
            for doc in k8s_docs() for c in containers(doc) if "cnnsearch" in c.get("command", [])[:1]]


def slurm_commands():
    found = []
    for path in SLURM:
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continued lines
        for line in text.splitlines():
            if not line.lstrip().startswith("#") and re.search(r"(^|\s)cnnsearch\s", line):
                words = shlex.split(placeholders(line))
                found.append(words[words.index("cnnsearch"):])
    return found


def test_templates_exist_and_contain_cnnsearch_commands():
    assert {p.name for p in MANIFESTS} >= {"postgres.yaml", "worker-job.yaml"} and SLURM
    assert any(cmd[1] == "worker" for cmd in k8s_commands()) and any(cmd[1] == "worker" for cmd in slurm_commands())


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@")
SECRET_NAMES = re.compile(r"PASSWORD|PASSWD|STORAGE|URL|SECRET|TOKEN", re.I)


def storage_on_command_line(argv: list[str]) -> list[str]:
    """The words of a command line that carry a storage URL: --storage (its value would be the
    URL, whatever variable it is spelled as) or a URL itself."""
    return [w for w in argv if w == "--storage" or w.startswith("--storage=") or URL.match(w)]


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def secrets_in_manifest(doc: dict) -> list[str]:
    """What a manifest must not hold: a URL with a password anywhere, a Secret's contents, an env
    var named like a password, URL or token with a literal value instead of a secretKeyRef, a
    storage URL in a container's command or args."""
    found = [f"URL with a password: {URL_WITH_PASSWORD.search(s).group(0)}..." for s in _strings(doc)
             if URL_WITH_PASSWORD.search(s)]
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        found.append(f"Secret {doc.get('metadata', {}).get('name')} with its values in the manifest")
    for c in containers(doc):
        for e in c.get("env", []):
            if SECRET_NAMES.search(e["name"]) and "secretKeyRef" not in (e.get("valueFrom") or {}):
                found.append(f"{c['name']}: env {e['name']} not from a secretKeyRef")
        words = [str(w) for w in c.get("command", []) + c.get("args", [])]
        found += [f"{c['name']}: {w} on the command line" for w in storage_on_command_line(words)]
    return found


@pytest.mark.parametrize("argv", k8s_commands() + slurm_commands(), ids=lambda a: " ".join(a[:3]))
def test_every_command_is_accepted_by_the_cli(argv):
    params = parse_cli(argv[1:])
    if argv[1] == "worker":
        assert params["name"] and params["quiet"]


@pytest.mark.parametrize("argv", k8s_commands() + slurm_commands(), ids=lambda a: " ".join(a[:3]))
def test_no_storage_url_on_any_command_line(argv):
    assert storage_on_command_line(argv) == [], "the storage URL must come from CNNSEARCH_STORAGE(_FILE)"


def test_no_password_or_storage_url_in_any_manifest():
    assert MANIFESTS
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            assert not secrets_in_manifest(doc or {}), (path.name, secrets_in_manifest(doc))


def test_the_leak_checks_catch_urls_and_literal_passwords():
    assert storage_on_command_line(["worker", "s", "--storage", "PLACEHOLDER", "--quiet"]) == ["--storage"]
    assert storage_on_command_line(["worker", "s", "--storage=sqlite:///x.db"]) == ["--storage=sqlite:///x.db"]
    assert storage_on_command_line(["create", "postgresql+psycopg://u@h/db"]) == ["postgresql+psycopg://u@h/db"]
    assert storage_on_command_line(["worker", "s", "--quiet"]) == []
    leaky = {"kind": "Job", "spec": {"template": {"spec": {"containers": [{
        "name": "worker", "command": ["cnnsearch", "worker", "s", "--storage", "postgresql+psycopg://u@postgres/db"],
        "env": [{"name": "PGPASSWORD", "value": "hunter2"},
                {"name": "CNNSEARCH_STORAGE", "value": "postgresql+psycopg://u:hunter2@postgres/db"},
                {"name": "CNNSEARCH_DATA", "value": "/data"}]}]}}}}
    found = " | ".join(secrets_in_manifest(leaky))
    assert "URL with a password" in found and "env PGPASSWORD not from" in found
    assert "env CNNSEARCH_STORAGE not from" in found and "--storage on the command line" in found
    assert "CNNSEARCH_DATA" not in found
    assert secrets_in_manifest({"kind": "Secret", "stringData": {"password": "x"}})
    assert not secrets_in_manifest({"kind": "Job", "spec": {"template": {"spec": {"containers": [{
        "name": "w", "command": ["cnnsearch", "worker", "s"],
        "env": [{"name": "CNNSEARCH_STORAGE", "valueFrom": {"secretKeyRef": {"name": "n", "key": "url"}}}]}]}}}})


def test_the_checker_rejects_bad_command_lines():
    for argv in (["worker", "mnist_pooling", "--storag", "x"], ["wurker", "mnist_pooling"], ["worker"]):
        with pytest.raises(typer.TyperException):  # click's UsageError, as Typer vendors it
            parse_cli(argv)


def test_postgres_has_a_volume_a_service_and_a_secret_password():
    kinds = {doc["kind"]: doc for doc in yaml.safe_load_all((SCRIPTS / "k8s" / "postgres.yaml").read_text())}
    assert kinds["Service"]["metadata"]["name"] == "postgres"
    assert kinds["Service"]["spec"]["ports"][0]["port"] == 5432
    db = kinds["StatefulSet"]["spec"]
    assert db["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    env = {e["name"]: e for e in db["template"]["spec"]["containers"][0]["env"]}
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]


def test_workers_request_one_gpu_each_and_take_the_storage_url_from_a_secret():
    (job,) = [doc for doc in k8s_docs() if doc["kind"] == "Job"]
    assert job["spec"]["parallelism"] >= 2
    worker = job["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    for c in containers(job):
        env = {e["name"]: e for e in c["env"]}
        assert env["CNNSEARCH_STORAGE"]["valueFrom"]["secretKeyRef"] == {"name": "cnnsearch-postgres", "key": "url"}
        assert "--storage" not in c["command"] + c.get("args", [])


def test_slurm_script_is_an_array_with_one_gpu_per_task():
    for path in SLURM:
        text = path.read_text()
        assert re.search(r"^#SBATCH --array=", text, re.M) and re.search(r"^#SBATCH --gres=gpu:1$", text, re.M)
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert "--storage" not in code  # the worker reads CNNSEARCH_STORAGE or CNNSEARCH_STORAGE_FILE itself
        assert "CNNSEARCH_STORAGE" in code and "CNNSEARCH_STORAGE_FILE" in code
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
