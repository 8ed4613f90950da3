"""Static checks of the container deployment: Dockerfile, docker-compose*.yml, .env.example.

The compose files are read as YAML and checked against the files they mount (the very
``orthanc.json`` and Lua script the integration tests run Orthanc with), against each other
(service names, ports, AE titles) and against the node's own configuration model: the
container's environment (Dockerfile ENV, then compose's) is loaded with ``load_config``, so a
misspelt ``CXR_NODE_*`` variable fails here, not at ``docker compose up``. No Docker engine is
needed; ``docker compose config`` runs only where the compose plugin is installed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import pytest
import yaml
from helpers import ROOT

from node.cli import build_parser
from node.core.config import NodeConfig, ScpConfig, load_config

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
GITIGNORE = ROOT / ".gitignore"
# the files tests/conftest.py starts Orthanc with
ORTHANC_JSON = ROOT / "orthanc.json"
LUA = ROOT / "config" / "route-to-node.lua"
CREDENTIALS_LUA = ROOT / "config" / "refuse-empty-credentials.lua"
HOST_ORTHANC_JSON = ROOT / "deploy" / "orthanc-host.json"
NODE_TOML = ROOT / "config" / "node.toml"

ORTHANC = "orthanc"  # compose service names
NODE = "cxr-node"
MODALITY = "cxr-node"  # orthanc.json DicomModalities entry the Lua script sends to
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SECRET_KEY = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY", re.IGNORECASE)
# ${VAR:?message}: compose refuses to start where VAR is unset or empty
REQUIRED_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}$")


# -- readers -----------------------------------------------------------------------------
def read_yaml(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path.name}: not a YAML mapping"
    return doc


class ComposeRefuses(ValueError):
    """A required variable (``${VAR:?message}``) is unset: compose would not start."""


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}``,
    ``${VAR?message}`` and ``$$``."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op in {":?", "?"} and (name not in env or (op == ":?" and not env[name])):
            raise ComposeRefuses(f"{name}: {default}")
        return env.get(name, "")

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", sub, value)


def scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {str(k): scalar(v) for k, v in env.items()}


def env_files(service: dict[str, Any]) -> list[str]:
    files = service.get("env_file") or []
    files = [files] if isinstance(files, str) else files
    return [f["path"] if isinstance(f, dict) else f for f in files]


class Mount(NamedTuple):
    source: str | None  # None: anonymous volume
    target: str
    read_only: bool
    bind: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            src, dst, ro = v.get("source"), v["target"], bool(v.get("read_only"))
            bind = v.get("type") == "bind"
        else:
            parts = v.split(":")
            src, dst = (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
            bind = src is not None and src.startswith(("/", ".", "~"))
        out.append(Mount(src, dst, ro, bind))
    return out


def container_ports(service: dict[str, Any]) -> dict[int, int | None]:
    """``{container port: published host port}``."""
    out: dict[int, int | None] = {}
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            published = p.get("published")
            out[int(p["target"])] = int(published) if published else None
            continue
        parts = str(p).split("/")[0].split(":")
        out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else None
    return out


def networks(service: dict[str, Any]) -> set[str]:
    return set(service.get("networks") or [])


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    assert test[0] == "CMD", f"healthcheck test {test!r}"
    return list(test[1:])


def merge(base: Any, over: Any) -> Any:
    """Compose's merge of an override file for mappings; scalars and lists are replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base.get(k), v) if k in base else v
        return out
    return over


class Instruction(NamedTuple):
    name: str
    args: str


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        name, _, args = (buf + line).strip().partition(" ")
        out.append(Instruction(name.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continuation line"
    return out


def instructions(name: str) -> list[str]:
    return [i.args for i in dockerfile() if i.name == name]


def key_values(args: str) -> dict[str, str]:
    """``ENV``/``ARG`` arguments: ``K=V K2="v 2"`` (or the legacy ``ENV K V``)."""
    tokens = shlex.split(args)
    if "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.partition("=")[::2] for t in tokens)


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        env.update(key_values(args))
    return env


def exec_form(args: str) -> list[str]:
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
    return argv


def dockerfile_healthcheck_argv() -> list[str]:
    [args] = instructions("HEALTHCHECK")
    _, cmd, command = args.partition("CMD ")
    assert cmd, f"HEALTHCHECK without CMD: {args!r}"
    command = command.strip()
    return exec_form(command) if command.startswith("[") else shlex.split(command)


def copies() -> list[tuple[list[str], str]]:
    """``COPY`` instructions as (sources, destination); flags such as --chown dropped."""
    out = []
    for args in instructions("COPY"):
        tokens = exec_form(args) if args.startswith("[") else shlex.split(args)
        tokens = [t for t in tokens if not t.startswith("--")]
        out.append((tokens[:-1], tokens[-1]))
    return out


def node_config(compose_env: dict[str, str]) -> NodeConfig:
    """What the node in the container runs with: image ENV, then compose's environment."""
    return load_config(NODE_TOML, {**dockerfile_env(), **compose_env})


def accepts_calling_aet(scp: ScpConfig, aet: str) -> bool:
    if getattr(scp, "accept_any_calling_aet", False):
        return True
    allowed = getattr(scp, "allowed_calling_aets", None)
    return allowed is None or aet in allowed


def dockerignore_patterns() -> list[str]:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    return [ln.strip("/") for ln in lines if ln and not ln.startswith("#")]


def dockerignored(path: str) -> bool:
    """Whether ``path`` (relative, POSIX) or a folder above it matches a .dockerignore line."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pats = {pat, pat.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, q) for p in prefixes for q in pats):
            ignored = not negate
    return ignored


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return read_yaml(COMPOSE)


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return read_yaml(COMPOSE_GPU)


@pytest.fixture(scope="module")
def orthanc_cfg() -> dict[str, Any]:
    cfg = json.loads(ORTHANC_JSON.read_text())
    assert isinstance(cfg, dict)
    return cfg


@pytest.fixture(scope="module")
def orthanc(compose: dict[str, Any]) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"][ORTHANC]
    return service


@pytest.fixture(scope="module")
def node(compose: dict[str, Any]) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"][NODE]
    return service


@pytest.fixture(scope="module")
def node_cfg(node: dict[str, Any]) -> NodeConfig:
    return node_config(environment(node))


# -- compose: files and volumes ----------------------------------------------------------
def test_compose_files_define_the_two_services(
    compose: dict[str, Any], gpu: dict[str, Any]
) -> None:
    assert set(compose["services"]) == {ORTHANC, NODE}
    assert "image" in compose["services"][ORTHANC]
    assert not compose["services"][ORTHANC]["image"].endswith(":latest")
    assert ":" in compose["services"][ORTHANC]["image"], "pin the Orthanc image's tag"
    # the override only amends services the base file defines
    assert set(gpu["services"]) <= set(compose["services"])


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_bind_mounted_and_build_paths_exist(path: Path) -> None:
    doc = read_yaml(path)
    for name, service in doc["services"].items():
        for m in mounts(service):
            if m.bind:
                assert m.source is not None
                assert (ROOT / m.source).exists(), f"{name}: bind source {m.source} missing"
        for env_file in env_files(service):
            assert (ROOT / env_file).resolve().parent == ROOT, f"{name}: env_file {env_file}"
        build = service.get("build")
        if isinstance(build, str):
            build = {"context": build}
        if build and "context" in build:
            context = ROOT / build["context"]
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file()


def test_named_volumes_are_declared(compose: dict[str, Any], gpu: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {}) | set(gpu.get("volumes") or {})
    for doc in (compose, gpu):
        for name, service in doc["services"].items():
            for m in mounts(service):
                assert m.source is not None, f"{name}: anonymous volume at {m.target}"
                if not m.bind:
                    assert m.source in declared, f"{name}: volume {m.source} not declared"


def test_orthanc_storage_is_a_named_volume(
    orthanc: dict[str, Any], compose: dict[str, Any], orthanc_cfg: dict[str, Any]
) -> None:
    by_target = {m.target: m for m in mounts(orthanc)}
    for key in ("StorageDirectory", "IndexDirectory"):
        m = by_target.get(orthanc_cfg[key])
        assert m is not None, f"orthanc.json {key} {orthanc_cfg[key]} is not a mount"
        assert not m.bind and m.source in compose["volumes"], f"{key}: not a named volume"
        assert not m.read_only


def test_orthanc_mounts_the_repos_config_and_lua_files(orthanc: dict[str, Any]) -> None:
    binds = {(ROOT / m.source).resolve(): m for m in mounts(orthanc) if m.bind and m.source}
    config = binds.get(ORTHANC_JSON.resolve())
    lua = binds.get(LUA.resolve())
    assert config is not None, "orthanc.json (the file the integration tests use) not mounted"
    assert lua is not None, "config/route-to-node.lua not mounted"
    assert config.read_only and lua.read_only
    # orthancteam/orthanc builds its configuration from every /etc/orthanc/*.json file
    target = PurePosixPath(config.target)
    assert target.parent == PurePosixPath("/etc/orthanc") and target.suffix == ".json"
    others = [
        m.target
        for m in mounts(orthanc)
        if m != config and PurePosixPath(m.target).match("/etc/orthanc/*.json")
    ]
    assert not others, f"other configuration files would be merged in: {others}"


def test_lua_scripts_path_is_the_lua_mount_target(
    orthanc: dict[str, Any], orthanc_cfg: dict[str, Any]
) -> None:
    by_source = {(ROOT / m.source).resolve(): m for m in mounts(orthanc) if m.source}
    lua, refuse = by_source[LUA], by_source[CREDENTIALS_LUA]
    # the credentials filter first, then the route
    assert orthanc_cfg["LuaScripts"] == [refuse.target, lua.target]
    assert lua.read_only and refuse.read_only
    # and the script sends to the DicomModalities entry of that name
    assert f'SendToModality(instanceId, "{MODALITY}")' in LUA.read_text()
    assert MODALITY in orthanc_cfg["DicomModalities"]


def test_orthanc_route_keeps_no_association_to_the_node_open(orthanc_cfg: dict[str, Any]) -> None:
    # Orthanc 1.10 keeps the Lua route's association open for DicomAssociationCloseDelay
    # seconds (default 5) after each image and does not notice when the node behind it died:
    # after a node restart every image arriving within 5 s of the previous one failed on the
    # dead association ("Broken pipe"; bench/RESULTS.md 2026-11-28, 34-40 of 60 images lost
    # while the restarted node was up). 0 closes it after each image: none lost.
    assert orthanc_cfg["DicomAssociationCloseDelay"] == 0


def test_orthanc_has_tcp_nodelay(orthanc: dict[str, Any]) -> None:
    assert environment(orthanc).get("TCP_NODELAY") == "1"


# -- compose: credentials ----------------------------------------------------------------
def test_credentials_are_not_hard_coded(
    compose: dict[str, Any], gpu: dict[str, Any], orthanc_cfg: dict[str, Any]
) -> None:
    orthanc = compose["services"][ORTHANC]
    assert orthanc_cfg["RegisteredUsers"] == {"${ORTHANC_USER}": "${ORTHANC_PASSWORD}"}
    for doc in (compose, gpu):
        for name, service in doc["services"].items():
            env = environment(service)
            for key, value in env.items():
                if SECRET_KEY.search(key) or key == "ORTHANC_USER":
                    assert REQUIRED_INTERPOLATION.match(value), f"{name}: {key} has a value"
    assert set(environment(orthanc)) >= {"ORTHANC_USER", "ORTHANC_PASSWORD"}
    example = dict(
        line.partition("=")[::2]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    assert {"ORTHANC_USER", "ORTHANC_PASSWORD"} <= set(example)
    texts = COMPOSE.read_text() + COMPOSE_GPU.read_text() + DOCKERFILE.read_text()
    for key in ("ORTHANC_USER", "ORTHANC_PASSWORD"):
        assert example[key] and example[key] not in texts, f"{key}'s value is in a file"
    # credentials on the healthcheck's command line are expanded in the container ($$VAR),
    # not by compose (${VAR} would write the password into the container's configuration)
    argv = healthcheck_argv(orthanc)
    for i, arg in enumerate(argv):
        opt, eq, value = arg.partition("=")
        if opt in {"--user", "--pwd"}:
            value = value if eq else argv[i + 1]
            assert value.startswith("$$"), f"orthanc healthcheck {opt} {value}"


def test_compose_refuses_to_start_without_the_credentials(orthanc: dict[str, Any]) -> None:
    env = environment(orthanc)
    for key in ("ORTHANC_USER", "ORTHANC_PASSWORD"):
        for missing in ({}, {key: ""}):
            with pytest.raises(ComposeRefuses, match=f"set {key} in .env"):
                interpolate(env[key], missing)
        assert interpolate(env[key], {key: "x"}) == "x"


@pytest.mark.parametrize("path", [ORTHANC_JSON, HOST_ORTHANC_JSON], ids=lambda p: p.name)
def test_remote_access_only_with_authentication(path: Path) -> None:
    cfg = json.loads(path.read_text())
    if cfg.get("RemoteAccessAllowed", False):
        assert cfg.get("AuthenticationEnabled") is True, f"{path.name}: remote without auth"
    # and no request without a user name, whatever the credentials (Lua filter, first)
    assert PurePosixPath(cfg["LuaScripts"][0]).name == CREDENTIALS_LUA.name
    assert "function IncomingHttpRequestFilter" in CREDENTIALS_LUA.read_text()


def test_the_host_orthanc_config_holds_no_credentials() -> None:
    """deploy/orthanc-host.json: the users come from the file install-host.sh generates
    (/etc/orthanc/credentials.json, 0600); without it nobody logs in."""
    cfg = json.loads(HOST_ORTHANC_JSON.read_text())
    assert "RegisteredUsers" not in cfg
    assert cfg["AuthenticationEnabled"] is True


def test_dot_env_is_ignored_by_git_and_docker() -> None:
    gitignore = [ln.strip() for ln in GITIGNORE.read_text().splitlines()]
    assert any(ln in {".env", "/.env"} for ln in gitignore), ".env not in .gitignore"
    assert dockerignored(".env"), ".env not in .dockerignore"
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():
        ignored = subprocess.run([git, "check-ignore", "-q", ".env"], cwd=ROOT, check=False)
        assert ignored.returncode == 0, "git does not ignore .env"
        tracked = subprocess.run(
            [git, "ls-files", "--error-unmatch", ".env"], cwd=ROOT, capture_output=True
        )
        assert tracked.returncode != 0, ".env is tracked by git"


# -- compose: how the two services find each other --------------------------------------
def test_node_sends_to_the_orthanc_service(
    compose: dict[str, Any], node_cfg: NodeConfig, orthanc_cfg: dict[str, Any]
) -> None:
    dest = node_cfg.destination
    assert dest.host == ORTHANC and dest.host in compose["services"]
    assert dest.port == orthanc_cfg["DicomPort"]
    assert dest.ae_title == orthanc_cfg["DicomAet"]
    ports = container_ports(compose["services"][ORTHANC])
    assert orthanc_cfg["DicomPort"] in ports and orthanc_cfg["HttpPort"] in ports


def test_orthanc_routes_to_the_node_service(
    compose: dict[str, Any],
    node: dict[str, Any],
    node_cfg: NodeConfig,
    orthanc_cfg: dict[str, Any],
) -> None:
    modality = orthanc_cfg["DicomModalities"][MODALITY]
    assert modality["Host"] == NODE and NODE in compose["services"]
    assert node.get("hostname", NODE) == NODE
    assert modality["Port"] == node_cfg.scp.port
    assert modality["Port"] in container_ports(node), "the node's SCP port is not published"
    exposed = {p.split("/")[0] for args in instructions("EXPOSE") for p in args.split()}
    assert str(modality["Port"]) in exposed, "the Dockerfile does not EXPOSE the SCP port"
    assert modality["AET"] == node_cfg.scp.ae_title
    assert node_cfg.scp.bind_address == "0.0.0.0", "the SCP must listen beyond loopback"
    assert accepts_calling_aet(node_cfg.scp, orthanc_cfg["DicomAet"]), "node refuses Orthanc"


def test_orthanc_lets_the_node_catch_up_over_query_retrieve(
    node_cfg: NodeConfig, orthanc_cfg: dict[str, Any]
) -> None:
    """The catch-up (node/jobs/catchup.py) C-FINDs and C-MOVEs as the node's calling AE title, to
    the node's own AE title: Orthanc must know it by that title and allow both, and the node
    must accept the C-STOREs Orthanc then makes as its DicomAet."""
    from node.jobs.catchup import qr_peer

    assert node_cfg.catchup.enabled
    peer = qr_peer(node_cfg)
    assert (peer.host, peer.port, peer.ae_title) == ("orthanc", 4242, orthanc_cfg["DicomAet"])
    entries = [
        m for m in orthanc_cfg["DicomModalities"].values() if m["AET"] == peer.calling_ae_title
    ]
    assert entries, f"Orthanc does not know the catch-up's calling AE {peer.calling_ae_title}"
    for entry in entries:
        assert entry.get("AllowFind", True) and entry.get("AllowMove", True), entry
    movers = [
        m for m in orthanc_cfg["DicomModalities"].values() if m["AET"] == node_cfg.scp.ae_title
    ]
    assert movers, "Orthanc does not know the node's AE title as a C-MOVE destination"
    # nobody else may query or move: a stranger's calling AE is refused
    assert orthanc_cfg.get("DicomAlwaysAllowFind") is False
    assert orthanc_cfg.get("DicomAlwaysAllowMove") is False
    assert accepts_calling_aet(node_cfg.scp, orthanc_cfg["DicomAet"])


def test_services_share_a_declared_network(compose: dict[str, Any]) -> None:
    shared = networks(compose["services"][ORTHANC]) & networks(compose["services"][NODE])
    assert shared, "orthanc and cxr-node are on no common network"
    assert shared <= set(compose.get("networks") or {})


def test_startup_order_healthchecks_and_restart(compose: dict[str, Any]) -> None:
    orthanc, node = compose["services"][ORTHANC], compose["services"][NODE]
    assert node["depends_on"][ORTHANC]["condition"] == "service_healthy"
    assert healthcheck_argv(orthanc)
    for service in (orthanc, node):
        assert service.get("restart") in {"always", "unless-stopped", "on-failure"}


def echo_args(argv: list[str]) -> argparse.Namespace:
    assert argv[0] == "cxr-node", argv
    args = build_parser().parse_args(argv[1:])
    assert args.command == "echo", argv
    return args


@pytest.mark.parametrize("where", ["compose", "Dockerfile"])
def test_node_healthcheck_echoes_its_own_scp(
    where: str, node: dict[str, Any], node_cfg: NodeConfig
) -> None:
    argv = healthcheck_argv(node) if where == "compose" else dockerfile_healthcheck_argv()
    args = echo_args(argv)
    assert args.host in {"127.0.0.1", "localhost"}
    assert args.port == node_cfg.scp.port
    assert args.aet == node_cfg.scp.ae_title
    assert accepts_calling_aet(node_cfg.scp, args.calling_aet), (
        f"the SCP refuses the healthcheck's calling AE title {args.calling_aet}"
    )


def test_node_state_lives_on_named_volumes(node: dict[str, Any], node_cfg: NodeConfig) -> None:
    named = {PurePosixPath(m.target) for m in mounts(node) if not m.bind}
    volumes = {PurePosixPath(v) for args in instructions("VOLUME") for v in exec_form(args)}
    spool = PurePosixPath(node_cfg.spool.directory)
    models = PurePosixPath(node_cfg.model.cache_dir)
    assert spool.is_absolute() and models.is_absolute()
    for path in (spool, models):
        assert any(path == t or t in path.parents for t in named), f"{path}: not on a volume"
        assert any(path == v or v in path.parents for v in volumes), f"{path}: no VOLUME"


# -- Dockerfile --------------------------------------------------------------------------
def test_dockerfile_base_and_torch_index() -> None:
    assert instructions("FROM") == ["python:3.11-slim"]
    args: dict[str, str] = {}
    for a in instructions("ARG"):
        args.update(key_values(a))
    assert args.get("TORCH_INDEX_URL") == CPU_INDEX
    assert any(
        "pip install" in run and "--index-url" in run and "${TORCH_INDEX_URL}" in run
        for run in instructions("RUN")
    ), "torch is not installed from TORCH_INDEX_URL"


def test_dockerfile_runs_as_non_root() -> None:
    users = instructions("USER")
    assert users, "no USER: the node would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"USER {users[-1]}"


def test_dockerfile_healthcheck_and_expose() -> None:
    [healthcheck] = instructions("HEALTHCHECK")
    assert healthcheck.upper() != "NONE"
    echo_args(dockerfile_healthcheck_argv())
    exposed = {p.split("/")[0] for args in instructions("EXPOSE") for p in args.split()}
    assert "11112" in exposed


def test_dockerfile_cmd_uses_the_config_it_copies() -> None:
    [cmd] = instructions("CMD")
    argv = exec_form(cmd)
    assert argv[:2] == ["cxr-node", "serve"]
    config = PurePosixPath(argv[argv.index("--config") + 1])
    targets = {}
    for sources, dest in copies():
        for src in sources:
            target = PurePosixPath(dest)
            if dest.endswith("/"):
                target = target / PurePosixPath(src).name
            targets[target] = src
    assert config in targets, f"CMD's --config {config} is not what the Dockerfile copies"
    assert (ROOT / targets[config]).resolve() == NODE_TOML


def test_dockerfile_copies_what_the_context_holds() -> None:
    for sources, _ in copies():
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: missing"
            assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    for path in (".venv", "var", ".git", ".env", ".pytest_cache", ".mypy_cache", ".ruff_cache"):
        assert dockerignored(path), f"{path} is sent in the build context"


def test_dockerfile_env_is_valid_node_configuration() -> None:
    cfg = load_config(NODE_TOML, dockerfile_env())  # unknown CXR_NODE_* keys fail here
    assert cfg.scp.bind_address == "0.0.0.0"
    assert dockerfile_env().get("TCP_NODELAY") == "1"


def test_dockerfile_keeps_the_spool_private(node_cfg: NodeConfig) -> None:
    """The spool volume's folders are 0700 and owned by the node's user, no umask or chmod
    opens them again, and the node runs with a umask that masks group and other bits."""
    spool = PurePosixPath(node_cfg.spool.directory)
    volumes = [PurePosixPath(v) for args in instructions("VOLUME") for v in exec_form(args)]
    [volume] = [str(v) for v in volumes if v == spool or v in spool.parents]
    commands = [c.split() for run in instructions("RUN") for c in run.split("&&")]
    chmods = [c for c in commands if c and c[0] == "chmod"]
    assert [c[1] for c in chmods] == ["0700"], chmods
    assert {volume, str(spool)} <= set(chmods[0][2:])
    assert any(c[:2] == ["chown", "-R"] and volume in c for c in commands)
    everything = " ".join(i.args for i in dockerfile())
    assert "umask" not in everything
    assert node_cfg.spool.umask & 0o077 == 0o077
    assert load_config(NODE_TOML, dockerfile_env()).spool.umask & 0o077 == 0o077


# -- GPU override ------------------------------------------------------------------------
def test_gpu_override_reserves_an_nvidia_gpu(compose: dict[str, Any], gpu: dict[str, Any]) -> None:
    service = gpu["services"][NODE]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") in (1, "all") or d.get("device_ids"))
        for d in devices
    ), devices
    merged = merge(compose["services"][NODE], service)
    cfg = node_config(environment(merged))
    assert cfg.model.device == "cuda"
    index = interpolate(scalar(merged["build"]["args"]["TORCH_INDEX_URL"]))
    assert index.startswith("https://") and index != CPU_INDEX


# -- docker compose itself, where installed ----------------------------------------------
def _docker_compose() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        ok = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return docker if ok.returncode == 0 else None


def test_docker_compose_config(tmp_path: Path) -> None:
    docker = _docker_compose()
    if docker is None:
        pytest.skip("docker compose not installed")
    for name in ("docker-compose.yml", "docker-compose.gpu.yml", "Dockerfile", "orthanc.json"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "config", tmp_path / "config")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")  # env_file: .env must exist
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        argv = [docker, "compose", *(a for f in files for a in ("-f", f))]
        out = subprocess.run(
            [*argv, "config", "--format", "json"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        merged = json.loads(out.stdout)
        env = merged["services"][NODE]["environment"]
        want = "cuda" if len(files) == 2 else "auto"
        assert env["CXR_NODE_MODEL__DEVICE"] == want


def test_the_node_admits_dicom_from_orthancs_address_alone(compose):
    """A calling AE title is not authentication: compose pins Orthanc's address and the
    node's scp.allowed_hosts admits it (and its own healthcheck) only."""
    import ipaddress

    orthanc_net = compose["services"][ORTHANC]["networks"]["dicom"]
    orthanc_ip = ipaddress.ip_address(orthanc_net["ipv4_address"])
    [subnet] = [c["subnet"] for c in compose["networks"]["dicom"]["ipam"]["config"]]
    assert orthanc_ip in ipaddress.ip_network(subnet)
    scp = node_config(environment(compose["services"][NODE])).scp
    allowed = [ipaddress.ip_network(a) for a in scp.allowed_hosts]
    assert any(orthanc_ip in net for net in allowed)
    assert any(ipaddress.ip_address("127.0.0.1") in net for net in allowed)
    gateway = next(ipaddress.ip_network(subnet).hosts())  # where published-port peers appear
    assert not any(gateway in net for net in allowed)
