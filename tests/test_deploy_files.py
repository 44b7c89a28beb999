"""The deployment files stay in step with the code: every MAILROOM_* variable they use is a
real setting, .env.example lists every setting with its true default, the compose file is
valid, and the Kubernetes manifests have what deploy/README.md promises."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from services.settings import ENV_PREFIX, Settings, load_settings
from tasks.queues import QUEUES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.test.yml"
DEPLOY = ROOT / "deploy"
ENV_EXAMPLE = ROOT / ".env.example"
VARIABLE = re.compile(r"\bMAILROOM_[A-Z0-9_]+")
FIELDS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}

yaml = pytest.importorskip("yaml")


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests() if doc["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def compose_command() -> list[str]:
    """`docker compose`, else the older `docker-compose`; skip when neither works here."""
    if shutil.which("docker") is None and shutil.which("docker-compose") is None:
        pytest.skip("the docker client is not on PATH: cannot check the compose file's syntax")
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("docker is on PATH but has no compose plugin (and no docker-compose): cannot check syntax")


# --- no drift between the files and services/settings.py ---------------------------------------


@pytest.mark.parametrize(
    "path",
    [COMPOSE, ENV_EXAMPLE, ROOT / "Dockerfile", *sorted(p for p in DEPLOY.rglob("*") if p.is_file())],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_mailroom_variable_is_a_setting(path: Path) -> None:
    unknown = set(VARIABLE.findall(path.read_text())) - FIELDS
    assert not unknown, f"{path.name} uses variables services/settings.py does not have: {sorted(unknown)}"


def test_env_example_lists_every_setting_with_its_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    entry = re.compile(r"^(?:# )?(MAILROOM_[A-Z0-9_]+)=")
    listed = []
    for number, line in enumerate(lines):
        match = entry.match(line)
        if match:
            listed.append(match.group(1))
            above = lines[number - 1]  # a comment line above each one says what it does
            assert above.startswith("# ") and not entry.match(above), (
                f"{match.group(1)}: no explanation above it"
            )
    assert sorted(listed) == sorted(FIELDS), "each setting once, as NAME=default, or '# NAME=' if it has none"
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    from_example = Settings(_env_file=ENV_EXAMPLE)  # type: ignore[call-arg]
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    assert from_example.model_dump() == defaults.model_dump()


def test_configmap_and_secret_make_valid_production_settings() -> None:
    config = by_kind("ConfigMap")["mailroom-config"]["data"]
    secret = dict(by_kind("Secret")["mailroom-secrets"]["stringData"])
    secret["MAILROOM_SECRET_KEY"] = Fernet.generate_key().decode()  # the template holds a placeholder
    values = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in {**config, **secret}.items() if k in FIELDS}
    settings = load_settings(**values)
    assert not settings.is_sqlite and not settings.allow_private_hosts
    grace = by_kind("Deployment")["mailroom-worker-sync"]["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert grace > settings.task_hard_time_limit


# --- docker-compose.test.yml ---------------------------------------------------------------------


def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        [*compose_command(), "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_the_whole_stack() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for queue in QUEUES:
        command = services[f"worker-{queue}"]["command"]
        assert command[command.index("-Q") + 1] == queue
        assert f"{queue}@%h" in command
    expected = {
        "broker-redis",
        "result-redis",
        "postgres",
        "migrate",
        "api",
        "beat",
        "flower",
        "dovecot",
        "smtp",
    }
    assert expected <= set(services)
    assert services["migrate"]["command"] == ["mailroom", "db", "upgrade"]
    for name in ("broker-redis", "result-redis"):
        assert "--requirepass" in services[name]["command"]
    env = services["api"]["environment"]
    for name in ("BROKER_URL", "BROKER_PASSWORD", "RESULT_BACKEND_URL", "RESULT_BACKEND_PASSWORD",
                 "DATABASE_URL", "SECRET_KEY"):  # fmt: skip
        assert env[ENV_PREFIX + name]
    assert env["MAILROOM_ALLOW_PRIVATE_HOSTS"] == "true"


# --- deploy/ -------------------------------------------------------------------------------------


def test_one_worker_deployment_per_queue_with_liveness_and_resources() -> None:
    deployments = by_kind("Deployment")
    for queue in QUEUES:
        worker = deployments[f"mailroom-worker-{queue}"]
        spec = worker["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        main = container(worker)
        command = main["command"]
        assert command[command.index("-Q") + 1] == queue and f"{queue}@%h" in command
        probe = " ".join(main["livenessProbe"]["exec"]["command"])
        env = {item["name"]: item.get("value") for item in main["env"]}
        assert env["MAILROOM_WORKER_HEARTBEAT_FILE"] in probe and "-lt 60" in probe
        assert {"cpu", "memory"} <= main["resources"]["requests"].keys()
        assert {"cpu", "memory"} <= main["resources"]["limits"].keys()


def test_api_beat_and_flower() -> None:
    deployments = by_kind("Deployment")
    api = container(deployments["mailroom-api"])
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "mailroom.app:create_app()" in api["command"]
    assert "mailroom-api" in by_kind("Service")
    beat = deployments["mailroom-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    assert "flower" in container(deployments["mailroom-flower"])["command"]
    for deployment in deployments.values():
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        assert container(deployment)["resources"]["limits"]


def test_every_worker_scales_on_all_priorities_of_its_queue() -> None:
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in by_kind("ScaledObject").values()}
    assert set(scaled) == {f"mailroom-worker-{q}" for q in QUEUES}
    for queue in QUEUES:
        (trigger,) = scaled[f"mailroom-worker-{queue}"]["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        assert f'mailroom_queue_depth{{queue="{queue}"}}' in trigger["metadata"]["query"]


def test_core_manifests_match_the_kubernetes_schema() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed"
    )
    version = kubernetes_validate.latest_version()
    for doc in manifests():
        if doc["apiVersion"].split("/")[0] in {"keda.sh", "monitoring.coreos.com", "kustomize.config.k8s.io"}:
            continue  # custom resources: no schema bundled
        kubernetes_validate.validate(doc, version, strict=True)


def test_makefile_lists_its_targets() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not on PATH")
    listing = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "help"], capture_output=True, text=True, timeout=30
    )
    for target in ("help", "venv", "system-deps", "run", "test", "lint", "bench", "clean"):
        assert re.search(rf"^\s+{target}\s", listing.stdout, re.M), listing.stdout


def _exported_metric_names() -> set[str]:
    """Every metric name the API and the workers define (their source is the list)."""
    names: set[str] = set()
    for source in (ROOT / "src/mailroom/metrics.py", ROOT / "tasks/metrics.py"):
        names |= _queried_metric_names(" ".join(re.findall(r'"(mailroom_[a-z_]+)"', source.read_text())))
    return names


def _queried_metric_names(text: str) -> set[str]:
    found = set(re.findall(r"\bmailroom_[a-z_]+", text))
    return {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in found}


def test_alerts_dashboard_and_autoscaling_query_only_metrics_that_exist() -> None:
    import json

    exported = _exported_metric_names()
    assert {"mailroom_worker_tasks", "mailroom_queue_wait_seconds", "mailroom_queue_depth"} <= exported
    (rules,) = by_kind("PrometheusRule").values()
    alerts = {rule["alert"]: rule for group in rules["spec"]["groups"] for rule in group["rules"]}
    assert {
        "MailroomQueueWaitHigh",
        "MailroomTaskFailureRate",
        "MailroomNoWorkerOnQueue",
        "MailroomBeatSilent",
        "MailroomDependencyDown",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"} and rule["annotations"]["summary"], name
        assert _queried_metric_names(rule["expr"]) <= exported, name
    dashboard = json.loads((DEPLOY / "grafana" / "mailroom-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        assert _queried_metric_names(expr) <= exported, expr
    for scaled in by_kind("ScaledObject").values():
        for trigger in scaled["spec"]["triggers"]:
            assert _queried_metric_names(trigger["metadata"]["query"]) <= exported


def test_pods_are_locked_down_and_workers_reach_only_public_mail_ports() -> None:
    for kind in ("Deployment", "Job"):
        for name, doc in by_kind(kind).items():
            pod = doc["spec"]["template"]["spec"]
            assert pod["automountServiceAccountToken"] is False, name
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
    assert "mailroom-api" in by_kind("HorizontalPodAutoscaler")
    policies = by_kind("NetworkPolicy")
    mail = policies["mailroom-egress-mail"]["spec"]
    assert set(mail["podSelector"]["matchExpressions"][0]["values"]) == {f"worker-{q}" for q in QUEUES} | {
        "watcher"
    }
    (rule,) = mail["egress"]
    blocks = [peer["ipBlock"] for peer in rule["to"]]
    v4 = next(b for b in blocks if b["cidr"] == "0.0.0.0/0")
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16"} <= set(
        v4["except"]
    )
    assert {p["port"] for p in rule["ports"]} == {143, 993, 25, 465, 587}
    data = policies["mailroom-egress-dns-and-data"]["spec"]
    assert data["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mailroom"}
    ports = {p["port"] for r in data["egress"] for p in r["ports"]}
    assert {53, 5432, 6379} <= ports and not ports & {143, 993, 25, 465, 587}
