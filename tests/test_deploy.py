"""The Kubernetes and Slurm templates: well-formed, and every `cnnsearch` command in them parses."""

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


@pytest.mark.parametrize("argv", k8s_commands() + slurm_commands(), ids=lambda a: " ".join(a[:3]))
def test_every_command_is_accepted_by_the_cli(argv):
    params = parse_cli(argv[1:])
    if argv[1] == "worker":
        assert params["name"] and params["storage"] and params["quiet"]


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


def test_workers_request_one_gpu_each_and_take_the_password_from_a_secret():
    (job,) = [doc for doc in k8s_docs() if doc["kind"] == "Job"]
    assert job["spec"]["parallelism"] >= 2
    worker = job["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    for c in containers(job):
        env = {e["name"]: e for e in c["env"]}
        assert "secretKeyRef" in env["PGPASSWORD"]["valueFrom"]
        storage = c["command"][c["command"].index("--storage") + 1]
        assert storage.startswith("postgresql+psycopg://") and "@postgres" in storage
        assert ":" not in storage.split("://")[1].split("@")[0]  # no password in the URL


def test_slurm_script_is_an_array_with_one_gpu_per_task():
    for path in SLURM:
        text = path.read_text()
        assert re.search(r"^#SBATCH --array=", text, re.M) and re.search(r"^#SBATCH --gres=gpu:1$", text, re.M)
        assert '--storage "$CNNSEARCH_STORAGE" --quiet' in text
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
