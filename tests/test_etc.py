"""
The deployment files in C{etc/}: the container image
(C{etc/container/Containerfile}), the Kubernetes manifests
(C{etc/kubernetes/}) and the HAProxy example (C{etc/haproxy/}).

Nothing here builds an image or runs a cluster (neither is possible on
this machine), so each file is checked as far as it can be without them:

 - the manifests against the Kubernetes API's own schemas
   (C{kubernetes-validate}, which bundles them: no network), strictly (an
   unknown or misspelt field is an error), for the oldest and the newest
   API version the package knows; then against each other and against the
   image (selectors, names, keys, ports, user ids, the drain timings);
 - every pgtls configuration with pgtls's own loader. The loader insists
   that the files a configuration names exist (it does not read
   certificates: that happens at start), so the Kubernetes one is loaded
   from its volume laid out as the kubelet would lay it out (the ConfigMap's
   and the Secret's keys at the projected paths, under a temporary
   directory standing in for the mount point): a path the volume does not
   provide fails. The HAProxy one names host files, which get dummies;
 - the Containerfile with a small parser (instructions, user, COPY
   sources, the entry point), and by building the package's wheel from
   exactly the files it copies, as its C{pip install} does;
 - the HAProxy configuration with C{haproxy -c}, and against its pgtls
   configuration (ports, PROXY protocol, health checks).
"""

from __future__ import annotations

import ast
import base64
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from support.configdocs import FILE_KEYS
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from pgtls_twisted.config import Config, load_config, parse_duration
from twisted.plugins import pgtls_plugin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
ETC = REPO / "etc"
KUBERNETES = ETC / "kubernetes"
CONTAINERFILE = ETC / "container" / "Containerfile"
HAPROXY_CFG = ETC / "haproxy" / "haproxy.cfg"
HAPROXY_ROUTES = ETC / "haproxy" / "routes.toml"

#: Where the image reads its configuration and certificates (ENTRYPOINT's
#: --config, and the Deployment's mount).
CONFIG_DIR = "/etc/pgtls"


# ---------------------------------------------------------------------------
# Kubernetes: reading the manifests
# ---------------------------------------------------------------------------


def load_manifests() -> dict[str, dict[str, Any]]:
    """Every manifest in etc/kubernetes/, by kind: one object per file, one of each kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(documents) == 1, f"{path.name}: expected one object"
        (document,) = documents
        kind = document["kind"]
        assert kind not in found, f"{path.name}: a second {kind}"
        found[kind] = document
    return found


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    found = load_manifests()
    assert set(found) == {"ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service"}
    return found


def pod_spec(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = manifests["Deployment"]["spec"]["template"]["spec"]
    return spec


def pgtls_container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_spec(manifests)["containers"]
    return container  # type: ignore[no-any-return]


def secret_data(secret: dict[str, Any]) -> dict[str, bytes]:
    """A Secret's values, from stringData or (base64) data, as the API server merges them."""
    values = {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
    values.update({k: v.encode() for k, v in secret.get("stringData", {}).items()})
    return values


def volume_files(manifests: dict[str, dict[str, Any]], volume_name: str) -> dict[str, bytes]:
    """
    The files of one of the pod's volumes (ConfigMap, Secret or projected),
    by path inside it, as the kubelet writes them; a reference to an object
    or key that is not in etc/kubernetes/ fails here.
    """
    (volume,) = [v for v in pod_spec(manifests)["volumes"] if v["name"] == volume_name]
    sources = volume["projected"]["sources"] if "projected" in volume else [volume]
    files: dict[str, bytes] = {}
    for source in sources:
        if "configMap" in source:
            ref, obj = source["configMap"], manifests["ConfigMap"]
            data = {k: v.encode() for k, v in obj["data"].items()}
        else:
            ref = source["secret"] if "secret" in source else {"name": source["secretName"]}
            obj = manifests["Secret"]
            data = secret_data(obj)
        name = ref.get("name", ref.get("secretName"))
        assert name == obj["metadata"]["name"], f"volume {volume_name} names a missing {name}"
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            assert item["key"] in data, f"volume {volume_name}: no key {item['key']} in {name}"
            assert item["path"] not in files, f"volume {volume_name}: {item['path']} twice"
            files[item["path"]] = data[item["key"]]
    return files


def mount_of(container: dict[str, Any], path: str) -> dict[str, Any]:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    return mount  # type: ignore[no-any-return]


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or a Service's port (a number, or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number  # type: ignore[no-any-return]


def prestop_sleep(container: dict[str, Any]) -> float:
    """The seconds the preStop hook waits: `python -c "import time; time.sleep(N)"`."""
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"], command
    calls = [
        node
        for node in ast.walk(ast.parse(command[2]))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "time.sleep"
    ]
    (call,) = calls
    value = ast.literal_eval(call.args[0])
    assert isinstance(value, (int, float)) and value > 0
    return float(value)


def file_values(data: dict[str, Any]) -> Iterator[str]:
    """Every file path a parsed-TOML pgtls configuration names."""
    for route in data["proxy"]:
        for section, keys in FILE_KEYS.items():
            for key in keys:
                if key in route.get(section, {}):
                    yield route[section][key]
    if "password_file" in data.get("admin", {}):
        yield data["admin"]["password_file"]


def load_relocated(files: dict[str, bytes], root: Path) -> tuple[Config, dict[str, Any]]:
    """
    Load C{files["routes.toml"]} with pgtls's loader, the files laid out
    under C{root} as they would be under L{CONFIG_DIR}, and every
    C{/etc/pgtls/} path in the configuration moved there too.

    Every file key must name a path under L{CONFIG_DIR}: one elsewhere
    might exist on this machine by chance (a system CA bundle) and say
    nothing about the deployment. Files are written mode 0600, as a key
    owned by the running user must be (the kubelet's root-owned 0440 with
    fsGroup is the other form pgtls accepts; not reproducible without root).

    @return: the configuration, and the TOML as written (before relocation).
    """
    text = files["routes.toml"].decode()
    data = tomllib.loads(text)
    for value in file_values(data):
        assert value.startswith(CONFIG_DIR + "/"), f"{value} is not under {CONFIG_DIR}"
    for relative, content in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative == "routes.toml":
            content = text.replace(f'"{CONFIG_DIR}/', f'"{root}/').encode()
        target.write_bytes(content)
        target.chmod(0o600)
    return load_config(root / "routes.toml"), data


# ---------------------------------------------------------------------------
# Kubernetes: the schemas
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [all_versions()[0], kubernetes_validate.latest_version()])
def test_manifests_match_the_kubernetes_schemas(
    manifests: dict[str, dict[str, Any]], version: str
) -> None:
    """Strict: an unknown or misspelt field (readOnlyRootFileSystem) is an error too."""
    for kind, manifest in manifests.items():
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kind} is invalid for Kubernetes {version}: {e.message} at {e.path}")


def test_the_schema_check_catches_mistakes(manifests: dict[str, dict[str, Any]]) -> None:
    """The validator is not a no-op: a misspelt field and a wrong type are refused."""
    version = kubernetes_validate.latest_version()
    misspelt = copy.deepcopy(manifests["Deployment"])
    context = misspelt["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    wrong_type = copy.deepcopy(manifests["Deployment"])
    wrong_type["spec"]["replicas"] = "2"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, version, strict=True)


# ---------------------------------------------------------------------------
# Kubernetes: the manifests against each other
# ---------------------------------------------------------------------------


def test_selectors_match_the_pods(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert manifests["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    for constraint in pod_spec(manifests).get("topologySpreadConstraints", []):
        assert constraint["labelSelector"]["matchLabels"] == selector


def test_two_replicas_and_a_budget_that_keeps_one(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]["spec"]
    assert deployment["replicas"] == 2
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = manifests["PodDisruptionBudget"]["spec"]
    assert budget.get("maxUnavailable") == 1 or budget.get("minAvailable") == 1


def test_pod_runs_unprivileged_on_a_read_only_root(manifests: dict[str, dict[str, Any]]) -> None:
    pod = pod_spec(manifests)["securityContext"]
    container = pgtls_container(manifests)["securityContext"]
    assert pod["runAsNonRoot"] is True and container["runAsNonRoot"] is True
    assert pod["runAsUser"] != 0
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert pod_spec(manifests)["automountServiceAccountToken"] is False


def test_only_tmp_is_writable(manifests: dict[str, dict[str, Any]]) -> None:
    """
    The root file system is read-only; with workers > 1 the supervisor makes
    its run directory (the workers' control sockets) with
    C{tempfile.mkdtemp}, so in C{$TMPDIR} or C{/tmp}: an emptyDir there.
    Every other mount is read-only.
    """
    container = pgtls_container(manifests)
    assert not any(e["name"] == "TMPDIR" for e in container.get("env", []))
    tmp = mount_of(container, "/tmp")
    (volume,) = [v for v in pod_spec(manifests)["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume
    volumes = {v["name"] for v in pod_spec(manifests)["volumes"]}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes
        assert mount is tmp or mount.get("readOnly") is True, mount


def test_secret_and_config_placeholders_are_marked(manifests: dict[str, dict[str, Any]]) -> None:
    """No real key or certificate is shipped, and the placeholders say so."""
    secret = manifests["Secret"]
    assert secret["type"] == "kubernetes.io/tls"
    values = secret_data(secret)
    assert set(values) == {"tls.crt", "tls.key"}
    for value in values.values():
        assert b"PLACEHOLDER" in value
    assert "PLACEHOLDER DATA" in (KUBERNETES / "secret.yaml").read_text()
    for key, value in manifests["ConfigMap"]["data"].items():
        if key.endswith(".crt"):
            assert "PLACEHOLDER" in value


def test_configmap_routes_load_from_the_mounted_volume(
    manifests: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """
    routes.toml, loaded by pgtls's loader from the Deployment's volume as
    mounted at the ENTRYPOINT's configuration directory: every file it names
    is one the volume provides, and its ports are the Deployment's and the
    Service's.
    """
    container = pgtls_container(manifests)
    config_mount = mount_of(container, CONFIG_DIR)
    assert config_mount["readOnly"] is True
    files = volume_files(manifests, config_mount["name"])
    config, data = load_relocated(files, tmp_path / "etc-pgtls")
    assert set(file_values(data)) == {
        f"{CONFIG_DIR}/{path}" for path in files if path != "routes.toml"
    }

    # A Kubernetes Service sends no PROXY header.
    assert all(not route.listener.proxy_protocol for route in config.routes)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert all(p["protocol"] == "TCP" for p in container["ports"])
    listen_ports = {route.listener.port for route in config.routes}
    service_targets = {
        port_number(container, p["targetPort"]) for p in manifests["Service"]["spec"]["ports"]
    }
    assert service_targets == listen_ports
    assert config.metrics is not None
    metrics_port = config.metrics.port
    assert set(ports.values()) == listen_ports | {metrics_port}
    # The metrics address must be reachable on the pod IP by the kubelet.
    assert config.metrics.host in ("0.0.0.0", "::")
    assert metrics_port not in service_targets


def test_probes_and_drain_timing(manifests: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """
    Ready is /health on the metrics port (503 from the start of a drain);
    liveness is not /health (a drain would look dead); the grace period
    covers the preStop wait and the whole shutdown_timeout.
    """
    container = pgtls_container(manifests)
    files = volume_files(manifests, mount_of(container, CONFIG_DIR)["name"])
    config, _ = load_relocated(files, tmp_path / "etc-pgtls")
    assert config.metrics is not None
    metrics_port = config.metrics.port

    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == "/health"
    assert port_number(container, ready["port"]) == metrics_port
    live = container.get("livenessProbe", {})
    assert live.get("httpGet", {}).get("path") != "/health"

    sleep = prestop_sleep(container)
    assert 1 <= sleep <= 30
    grace = pod_spec(manifests)["terminationGracePeriodSeconds"]
    assert grace > config.shutdown_timeout + sleep
    assert config.shutdown_timeout == parse_duration("30s")


# ---------------------------------------------------------------------------
# The Containerfile
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def parse_containerfile(text: str) -> list[Instruction]:
    """
    Instructions, as podman and docker read them: a trailing backslash
    continues a line, comment lines are dropped (inside a continuation too).
    No parser directives or heredocs: the Containerfile uses neither.
    """
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = ""
    assert not pending, "the Containerfile ends in a continuation"
    return instructions


@pytest.fixture(scope="module")
def containerfile() -> list[Instruction]:
    return parse_containerfile(CONTAINERFILE.read_text())


def only(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def image_user(instructions: list[Instruction]) -> tuple[int, int]:
    """The uid and gid the image runs as: the last USER, which must be numeric."""
    users = only(instructions, "USER")
    assert users, "no USER: the image would run as root"
    user, _, group = users[-1].arguments.partition(":")
    assert user.isdigit() and group.isdigit(), "USER must be numeric (runAsNonRoot checks it)"
    return int(user), int(group)


def test_containerfile_instructions(containerfile: list[Instruction]) -> None:
    keywords = [i.keyword for i in containerfile]
    assert keywords[0] == "FROM"
    assert len(only(containerfile, "FROM")) == 1
    assert re.fullmatch(r"(docker\.io/library/)?python:3\.1[1-9]-slim", containerfile[0].arguments)
    for keyword in ("ENV", "RUN", "COPY", "USER", "EXPOSE", "ENTRYPOINT"):
        assert keyword in keywords, keyword
    env: dict[str, str] = {}
    for instruction in only(containerfile, "ENV"):
        env.update(item.split("=", 1) for item in shlex.split(instruction.arguments))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    # Nothing in the image would need a writable root at run time.
    assert not only(containerfile, "VOLUME")


def test_containerfile_runs_as_a_fixed_non_root_user(
    containerfile: list[Instruction], manifests: dict[str, dict[str, Any]]
) -> None:
    uid, gid = image_user(containerfile)
    assert uid != 0 and gid != 0
    keywords = [i.keyword for i in containerfile]
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert last_user < keywords.index("ENTRYPOINT")
    assert all(k not in ("RUN", "COPY", "ADD") for k in keywords[last_user:])
    # The user is created with that uid and gid.
    created = " ".join(i.arguments for i in only(containerfile, "RUN"))
    assert f"--uid {uid}" in created and f"--gid {gid}" in created
    # And the Deployment runs the pod as that user, its files in that group.
    pod = pod_spec(manifests)["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, gid, gid)


def copied_sources(containerfile: list[Instruction]) -> list[str]:
    sources: list[str] = []
    for instruction in only(containerfile, "COPY") + only(containerfile, "ADD"):
        words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
        assert instruction.keyword == "COPY", "ADD fetches and unpacks: use COPY"
        sources += words[:-1]
    return sources


def test_containerfile_copies_what_the_package_needs(containerfile: list[Instruction]) -> None:
    """Every COPY source exists, and pyproject's readme and packages are among them."""
    sources = copied_sources(containerfile)
    for source in sources:
        assert (REPO / source).exists(), source
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    assert needed <= set(sources)


def test_copied_files_build_the_package(containerfile: list[Instruction], tmp_path: Path) -> None:
    """
    The image's `pip install /src` on exactly the files COPY puts there: the
    wheel builds (setuptools as in the venv, no download), and holds the
    command line and the twist plugin.
    """
    context = tmp_path / "src"
    context.mkdir()
    for source in copied_sources(containerfile):
        origin = REPO / source
        if origin.is_dir():
            shutil.copytree(
                origin, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(origin, context / source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(tmp_path / "dist"), str(context)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"pgtls_twisted/__main__.py", "twisted/plugins/pgtls_plugin.py"} <= names


def test_containerfile_entrypoint_is_twist_pgtls(
    containerfile: list[Instruction], manifests: dict[str, dict[str, Any]]
) -> None:
    """
    Exec form (so twist is PID 1 and gets SIGTERM itself), a console script
    the installed packages provide, pgtls's own twist plugin, and the
    configuration file the Deployment mounts.
    """
    (entrypoint,) = only(containerfile, "ENTRYPOINT")
    argv = json.loads(entrypoint.arguments)
    assert argv[0] in {e.name for e in entry_points(group="console_scripts")}
    assert argv[0] == "twist"
    assert argv[1] == pgtls_plugin.pgtls.tapname
    assert argv[1] in {maker.tapname for maker in getPlugins(IServiceMaker)}
    assert argv[2:] == ["--config", f"{CONFIG_DIR}/routes.toml"]
    # The Deployment does not override it, and mounts routes.toml there.
    container = pgtls_container(manifests)
    assert "command" not in container and "args" not in container
    assert "routes.toml" in volume_files(manifests, mount_of(container, CONFIG_DIR)["name"])
    # The preStop hook's program is in the image (a python base image).
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "python"


def test_containerfile_exposes_the_deployment_ports(
    containerfile: list[Instruction], manifests: dict[str, dict[str, Any]]
) -> None:
    exposed = {
        int(word.split("/")[0])
        for instruction in only(containerfile, "EXPOSE")
        for word in instruction.arguments.split()
    }
    assert exposed == {p["containerPort"] for p in pgtls_container(manifests)["ports"]}


# ---------------------------------------------------------------------------
# HAProxy
# ---------------------------------------------------------------------------


def haproxy_binary() -> str:
    """HAProxy, also where Debian puts it (/usr/sbin, not on every user's PATH)."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail("haproxy not found (Debian package haproxy; .ci/run installs it)")
    return found


def haproxy_sections(text: str) -> dict[str, list[list[str]]]:
    """'section name' to its lines, each split into words, comments dropped."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if not raw[0].isspace():
            current = sections.setdefault(" ".join(words), [])
        else:
            current.append(words)
    return sections


def test_haproxy_accepts_the_example() -> None:
    """
    `haproxy -c`. The example names its servers as a deployment would
    (pgtls-1.internal): they do not resolve here, which HAProxy only warns
    about thanks to init-addr; any other warning or alert fails.
    """
    result = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Configuration file is valid" in output
    for line in output.splitlines():
        assert "[ALERT]" not in line, line
        if "[WARNING]" in line:
            assert "could not resolve address 'pgtls-" in line, line


def test_haproxy_example_matches_its_pgtls_configuration(tmp_path: Path) -> None:
    data = tomllib.loads(HAPROXY_ROUTES.read_text())
    files: dict[str, bytes] = {"routes.toml": HAPROXY_ROUTES.read_bytes()}
    for value in file_values(data):
        files[value.removeprefix(CONFIG_DIR + "/")] = b"dummy\n"
    config, _ = load_relocated(files, tmp_path / "etc-pgtls")
    (route,) = config.routes
    assert route.listener.proxy_protocol is True and route.listener.proxy_trusted
    assert config.metrics is not None
    metrics_port = config.metrics.port

    sections = haproxy_sections(HAPROXY_CFG.read_text())
    defaults = sections["defaults"]
    backend = sections["backend pgtls"]
    lines = defaults + backend
    assert ["mode", "tcp"] in defaults
    assert ["option", "httpchk", "GET", "/health"] in backend
    assert ["http-check", "expect", "status", "200"] in backend
    assert any(words[:2] == ["option", "redispatch"] for words in lines)
    assert any(words[0] == "retries" and int(words[1]) >= 1 for words in lines)
    assert ["option", "clitcpka"] in lines and ["option", "srvtcpka"] in lines
    timeouts = {words[1]: words[2] for words in lines if words[0] == "timeout"}
    for side in ("client", "server"):
        assert parse_duration(timeouts[side]) >= 3600, side
    (default_server,) = [words for words in backend if words[0] == "default-server"]
    servers = [words for words in backend if words[0] == "server"]
    assert len(servers) == 2
    for words in servers:
        options = default_server[1:] + words[3:]
        assert "send-proxy-v2" in options and "check" in options
        assert options[options.index("port") + 1] == str(metrics_port)
        assert int(words[2].rsplit(":", 1)[1]) == route.listener.port
    (bind,) = [words for words in sections["frontend postgres"] if words[0] == "bind"]
    assert bind[1].endswith(f":{route.listener.port}")
