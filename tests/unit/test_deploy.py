"""deploy/: the systemd unit, the Dockerfile, the compose file, the production config and
the certificate recipe of docs/production.md, each checked by a real tool or parser.

A missing tool (systemd-analyze, openssl, the ketanode entry point, the Compose schema of
check-jsonschema) is a failure with the way to install it, never a skip.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import threading
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from ketanode.config import load_settings
from ketanode.process.worker import WorkerPool
from ketanode.receive.listener import server_tls_context
from ketanode.send.sender import client_tls_context
from tests.support import REPO

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "ketanode.service"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
NODE_TOML = DEPLOY / "ketanode.toml"
ORTHANC_JSON = DEPLOY / "orthanc.json"
ENV_EXAMPLE = DEPLOY / "env.example"
PRODUCTION_MD = REPO / "docs" / "production.md"

SETUP_HINT = "run scripts/setup.sh (installs the Debian packages and the test extras)"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not on PATH: {SETUP_HINT}")
    return path


# ---------------------------------------------------------------- systemd unit


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: sections of key -> values (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    lines = iter(text.splitlines())
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"unit line {number}: {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def _one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key)
    assert values, f"{UNIT.name}: [Service] {key}= is missing"
    return values[-1]


def test_unit_has_the_hardening_directives() -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    expected = {
        "User": "ketanode",
        "Group": "ketanode",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "StateDirectory": "ketanode",
        "LogsDirectory": "ketanode",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
    }
    wrong = {k: service.get(k) for k, v in expected.items() if service.get(k, [None])[-1] != v}
    assert not wrong, f"{UNIT.name}: unexpected values {wrong}"
    assert set(_one(service, "RestrictAddressFamilies").split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
    }
    assert "@system-service" in service["SystemCallFilter"][0].split()
    assert "/var/lib/ketanode" in _one(service, "ReadWritePaths").split()
    assert re.fullmatch(r"\d+[KMGT]", _one(service, "MemoryMax"))
    assert int(_one(service, "LimitNOFILE")) >= 4096
    assert "KETANODE_CONFIG=/etc/ketanode/ketanode.toml" in service["Environment"]
    start_pre, start = _one(service, "ExecStartPre").split(), _one(service, "ExecStart").split()
    assert start_pre[1:] == ["db", "upgrade"] and start[1:] == ["serve"]
    assert start_pre[0] == start[0] and start[0].endswith("/ketanode")
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # Port 104 is documented, not granted.
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in UNIT.read_text()


def test_unit_stop_timeout_lets_running_jobs_go_back_to_the_queue() -> None:
    """The node's stop waits up to WorkerPool.stop(timeout) per worker thread; systemd must
    not SIGKILL it before that (plus time for the listener and the database)."""
    per_worker = inspect.signature(WorkerPool.stop).parameters["timeout"].default
    workers = load_settings(NODE_TOML, environ={}).pipeline.workers
    assert int(_one(_service(), "TimeoutStopSec")) >= per_worker * workers + 30


def test_unit_writable_paths_hold_every_path_the_config_writes() -> None:
    settings = load_settings(NODE_TOML, environ={})
    writable = [Path(p) for p in _one(_service(), "ReadWritePaths").split()]
    for path in (settings.spool.path, settings.pipeline.work_dir, settings.reports.path):
        assert any(path.is_relative_to(w) for w in writable), f"{path} is read-only for the unit"
    assert _one(_service(), "WorkingDirectory") == "/var/lib/ketanode"


def _unit_for_verify(tmp_path: Path, extra: str = "") -> Path:
    """A copy whose ExecStart/ExecStartPre run the real ketanode found on PATH."""
    ketanode = _tool("ketanode")
    text = UNIT.read_text().replace("/opt/ketanode/venv/bin/ketanode", ketanode)
    if extra:
        text = re.sub(r"^\[Service\]$", f"[Service]\n{extra}", text, count=1, flags=re.M)
    copy = tmp_path / "ketanode.service"
    copy.write_text(text)
    return copy


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    analyze = _tool("systemd-analyze")
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


def _about(output: str, unit: Path) -> list[str]:
    return [ln for ln in output.splitlines() if unit.name in ln or str(unit.parent) in ln]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _unit_for_verify(tmp_path)
    proc = _verify(unit)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert not _about(output, unit), output


def test_verify_check_catches_a_bad_directive(tmp_path: Path) -> None:
    """The check above is live: systemd-analyze reports an unknown key or a bad value
    (with exit code 0, hence the output check)."""
    unit = _unit_for_verify(tmp_path, "ProtectSystm=strict\nMemoryMax=lots")
    proc = _verify(unit)
    lines = _about(proc.stdout + proc.stderr, unit)
    assert any("ProtectSystm" in ln for ln in lines), lines
    assert any("lots" in ln for ln in lines), lines


def test_unit_exposure_score_is_low_and_documented() -> None:
    analyze = _tool("systemd-analyze")
    proc = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    score = float(match.group(1))
    print(f"systemd-analyze security: {score} {match.group(2)}")
    assert score <= 2.0, proc.stdout
    documented = re.search(r"rates it \*\*(\d+\.\d+) \((\w+)\)\*\*", PRODUCTION_MD.read_text())
    assert documented, "docs/production.md states the exposure score"
    assert (float(documented.group(1)), documented.group(2)) == (score, match.group(2))


# ---------------------------------------------------------------- Dockerfile

INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
    "WORKDIR",
}  # fmt: skip
FLAGS = {
    "FROM": {"platform"},
    "RUN": {"mount", "network", "security"},
    "COPY": {"from", "chown", "chmod", "link", "parents", "exclude"},
    "ADD": {"chown", "chmod", "link", "checksum", "keep-git-dir", "exclude"},
    "HEALTHCHECK": {"interval", "timeout", "start-period", "start-interval", "retries"},
}
DIRECTIVES = {"syntax", "escape", "check"}
_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|ms|s|m|h))+")


class DockerfileError(ValueError):
    pass


@dataclass
class Instruction:
    cmd: str
    line: int
    value: str
    flags: dict[str, str] = field(default_factory=dict)
    exec_form: list[str] | None = None


def _exec_form(value: str, where: str) -> list[str] | None:
    if not value.startswith("["):
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:  # docker would silently run it as a shell command
        raise DockerfileError(f"{where}: not a valid JSON array ({exc})") from exc
    if not (isinstance(parsed, list) and parsed and all(isinstance(a, str) for a in parsed)):
        raise DockerfileError(f"{where}: the exec form is a non-empty JSON array of strings")
    return parsed


def parse_dockerfile(text: str) -> list[Instruction]:
    """A strict Dockerfile parser (default escape character): known instructions and flags,
    valid exec forms, key=value ENV/LABEL, sane EXPOSE/HEALTHCHECK/STOPSIGNAL, FROM first."""
    lines = text.splitlines()
    i = 0
    while i < len(lines) and (m := re.fullmatch(r"#\s*(\w+)\s*=\s*(\S+)\s*", lines[i])):
        if m.group(1).lower() not in DIRECTIVES or (m.group(1) == "escape" and m.group(2) != "\\"):
            raise DockerfileError(f"line {i + 1}: unsupported parser directive {lines[i]!r}")
        i += 1
    out: list[Instruction] = []
    while i < len(lines):
        start, logical = i + 1, lines[i].rstrip()
        i += 1
        if not logical.strip() or logical.lstrip().startswith("#"):
            continue
        while logical.endswith("\\"):
            logical = logical[:-1]
            while True:
                if i >= len(lines):
                    raise DockerfileError(f"line {start}: line continuation at end of file")
                nxt = lines[i].rstrip()
                i += 1
                if nxt.lstrip().startswith("#"):
                    continue
                if not nxt.strip():
                    raise DockerfileError(f"line {i}: empty continuation line")
                break
            logical += nxt
        out.append(_instruction(logical.strip(), start))
    _check_order(out)
    return out


def _instruction(logical: str, line: int) -> Instruction:
    word, _, rest = logical.partition(" ")
    where = f"line {line} ({word})"
    if word not in INSTRUCTIONS:
        raise DockerfileError(f"{where}: unknown instruction (or not upper case)")
    rest = rest.strip()
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, eq, value = flag[2:].partition("=")
        if name not in FLAGS.get(word, set()) or not eq or not value:
            raise DockerfileError(f"{where}: unknown or empty flag {flag}")
        flags[name] = value
        rest = rest.strip()
    if not rest:
        raise DockerfileError(f"{where}: no arguments")
    ins = Instruction(word, line, rest, flags)
    if word == "HEALTHCHECK":
        kind, _, cmd = rest.partition(" ")
        if kind == "NONE" and not cmd and not flags:
            return ins
        if kind != "CMD" or not cmd.strip():
            raise DockerfileError(f"{where}: HEALTHCHECK takes CMD <command> or NONE")
        for name, value in flags.items():
            ok = value.isdigit() if name == "retries" else _DURATION.fullmatch(value)
            if not ok:
                raise DockerfileError(f"{where}: --{name}={value} is not valid")
        ins.value = cmd.strip()
        ins.exec_form = _exec_form(ins.value, where)
    elif word in ("CMD", "ENTRYPOINT", "RUN", "SHELL", "VOLUME", "COPY", "ADD"):
        ins.exec_form = _exec_form(rest, where)
        if word in ("CMD", "ENTRYPOINT", "SHELL") and ins.exec_form is None:
            # shell form runs under /bin/sh -c, which does not pass SIGTERM on
            raise DockerfileError(f"{where}: use the exec (JSON) form")
        if word in ("COPY", "ADD") and len(ins.exec_form or shlex.split(rest)) < 2:
            raise DockerfileError(f"{where}: needs a source and a destination")
    elif word in ("ENV", "LABEL"):
        pairs = shlex.split(rest)
        if not all(re.fullmatch(r"[A-Za-z_][\w.\-]*=.*", p, re.S) for p in pairs):
            raise DockerfileError(f"{where}: use key=value pairs")
    elif word == "EXPOSE":
        for port in rest.split():
            m = re.fullmatch(r"(\d{1,5})(/(tcp|udp))?", port)
            if not m or not 0 < int(m.group(1)) < 65536:
                raise DockerfileError(f"{where}: bad port {port}")
    elif word == "STOPSIGNAL":
        if not re.fullmatch(r"SIG[A-Z0-9+\-]+|\d+", rest):
            raise DockerfileError(f"{where}: bad signal {rest}")
    elif word == "WORKDIR" and not rest.startswith(("/", "$")):
        raise DockerfileError(f"{where}: use an absolute path")
    elif word == "FROM" and not re.fullmatch(r"[\w.\-/:@${}]+( (AS|as) [\w.\-]+)?", rest):
        raise DockerfileError(f"{where}: FROM image[:tag] [AS name]")
    return ins


def _check_order(instructions: list[Instruction]) -> None:
    if not instructions:
        raise DockerfileError("empty Dockerfile")
    first = next((ins for ins in instructions if ins.cmd != "ARG"), None)
    if first is None or first.cmd != "FROM":
        raise DockerfileError("the first instruction (after ARG) must be FROM")


def _dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_dockerfile_parses_strictly() -> None:
    instructions = _dockerfile()
    assert instructions[0].cmd == "FROM"
    assert instructions[0].value == "python:3.11-slim-bookworm"
    assert [i.cmd for i in instructions].count("FROM") == 1


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("FROM python:3.11\nRUNN true\n", "unknown instruction"),
        ('FROM python:3.11\nENTRYPOINT ["ketanode", serve]\n', "JSON array"),
        ("FROM python:3.11\nENTRYPOINT ketanode serve\n", "exec (JSON) form"),
        ("FROM python:3.11\nRUN true \\\n", "continuation at end of file"),
        ("FROM python:3.11\nCOPY --chwn=1 a /b\n", "unknown or empty flag"),
        ('FROM python:3.11\nHEALTHCHECK --interval=soon CMD ["true"]\n', "not valid"),
        ('FROM python:3.11\nHEALTHCHECK ["true"]\n', "CMD <command> or NONE"),
        ("FROM python:3.11\nENV A 1\n", "key=value"),
        ("FROM python:3.11\nEXPOSE 70000\n", "bad port"),
        ("USER nobody\nFROM python:3.11\n", "must be FROM"),
    ],
)
def test_dockerfile_parser_is_strict(text: str, error: str) -> None:
    with pytest.raises(DockerfileError, match=re.escape(error)):
        parse_dockerfile(text)


def test_dockerfile_runs_ketanode_serve_as_a_non_root_user() -> None:
    instructions = _dockerfile()
    users = [i for i in instructions if i.cmd == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].value.split(":")[0]
    assert user not in ("root", "0"), users[-1]
    created_before = " ".join(
        i.value for i in instructions[: instructions.index(users[-1])] if i.cmd == "RUN"
    )
    assert re.search(rf"useradd\b.*\b{user}\b", created_before), f"user {user} is never created"
    entrypoints = [i for i in instructions if i.cmd == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1].exec_form == ["ketanode", "serve"]
    assert not [i for i in instructions if i.cmd == "CMD"], "CMD would add arguments to serve"
    assert [i.value for i in instructions if i.cmd == "STOPSIGNAL"] == ["SIGTERM"]


def test_dockerfile_health_check_calls_health() -> None:
    instructions = _dockerfile()
    checks = [i for i in instructions if i.cmd == "HEALTHCHECK"]
    assert len(checks) == 1
    argv = checks[0].exec_form
    assert argv is not None and argv[:2] == ["python", "-c"], argv
    compile(argv[2], "<HEALTHCHECK>", "exec")  # the probe itself is valid Python
    env = dict(
        p.split("=", 1) for i in instructions if i.cmd == "ENV" for p in shlex.split(i.value)
    )
    settings = load_settings(NODE_TOML, environ={})
    assert "KETANODE_HEALTH_URL" in argv[2]
    assert env["KETANODE_HEALTH_URL"] == f"http://127.0.0.1:{settings.web.port}/health"
    assert settings.web.enabled
    assert env["KETANODE_CONFIG"] == "/etc/ketanode/ketanode.toml"
    exposed = {p for i in instructions if i.cmd == "EXPOSE" for p in i.value.split()}
    assert exposed == {str(settings.node.port), str(settings.web.port)} == {"11112", "8080"}


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    ignored = [
        ln.strip()
        for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    copies = [i for i in _dockerfile() if i.cmd in ("COPY", "ADD")]
    assert copies
    for ins in copies:
        assert "from" not in ins.flags
        sources = (ins.exec_form or shlex.split(ins.value))[:-1]
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the build context"
            assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"{src} is ignored"
    copied = {s for ins in copies for s in shlex.split(ins.value)[:-1]}
    # what the wheel is built from (tests/e2e/test_wheel_install.py builds the same)
    assert {"pyproject.toml", "setup.py", "README.md", "ketanode", "migrations"} <= copied


def test_dockerfile_and_unit_install_the_wheel() -> None:
    """Both install ketanode from its wheel (which carries the migrations), never editable
    from a source tree (issue 14)."""
    runs = " ".join(i.value for i in _dockerfile() if i.cmd == "RUN")
    assert re.search(r"\bpip wheel\b[^&]*\s\.(\s|$)", runs), runs
    assert re.search(r"\bpip install\b[^&]*\S+\.whl\b", runs), runs
    assert re.search(r"\bketanode db upgrade\b", runs), "the image build checks the migrations"
    guide = re.search(r"## systemd\n(.*?)\n## ", PRODUCTION_MD.read_text(), re.S)
    assert guide, "docs/production.md has a systemd section"
    for name, text in (("Dockerfile", runs), (UNIT.name, UNIT.read_text()),
                       ("docs/production.md", PRODUCTION_MD.read_text())):  # fmt: skip
        assert not re.search(r"pip install\b[^&\n]*\s(-e|--editable)\s", text), name
    for text in (UNIT.read_text(), guide.group(1)):
        assert re.search(r"/opt/ketanode/venv/bin/pip wheel --no-deps -w (\S+) ", text)
        assert re.search(r"/opt/ketanode/venv/bin/pip install \S+/ketanode-\*\.whl", text)


# ---------------------------------------------------------------- compose

_PLACEHOLDER = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(:?[-?][^}]*)?\}")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _compose_schema() -> dict[str, Any]:
    try:
        vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError as exc:
        raise AssertionError(
            f"the Compose Specification schema comes with check-jsonschema: {SETUP_HINT}"
        ) from exc
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    assert isinstance(schema, dict)
    return schema


def _schema_errors(document: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_compose_file_matches_the_compose_specification() -> None:
    assert _schema_errors(_compose()) == []


def test_compose_schema_check_is_live() -> None:
    broken = _compose()
    broken["services"]["node"]["depends_on"]["postgres"]["condition"] = "service_happy"
    broken["services"]["postgres"]["helthcheck"] = broken["services"]["postgres"]["healthcheck"]
    errors = _schema_errors(broken)
    assert any("service_happy" in e for e in errors), errors
    assert any("helthcheck" in e for e in errors), errors


def test_compose_services_ports_and_start_order() -> None:
    services = _compose()["services"]
    assert set(services) == {"node", "postgres", "orthanc"}
    node, postgres, orthanc = services["node"], services["postgres"], services["orthanc"]
    assert node["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert (DEPLOY / node["build"]["context"]).resolve() == REPO
    assert (REPO / node["build"]["dockerfile"]).resolve() == DOCKERFILE
    # Ports as docs/production.md documents them: DICOM open, HTTP on host loopback only.
    assert node["ports"] == ["11112:11112", "127.0.0.1:8080:8080"]
    assert all(p.startswith("127.0.0.1:") for p in orthanc["ports"])
    assert "ports" not in postgres
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert orthanc["image"].split(":")[0] in ("orthancteam/orthanc", "jodogne/orthanc")
    mounts = {m.split(":")[1]: m.split(":")[0] for m in node["volumes"] + orthanc["volumes"]}
    assert mounts["/etc/ketanode/ketanode.toml"] == "./ketanode.toml"
    assert mounts["/etc/orthanc/orthanc.json"] == "./orthanc.json"
    assert node["environment"]["KETANODE__DATABASE__URL"].startswith("postgresql://")
    assert "@postgres:5432/" in node["environment"]["KETANODE__DATABASE__URL"]
    assert node["stop_grace_period"] == "90s" and node["stop_signal"] == "SIGTERM"
    for text in (p.read_text() for p in (DOCKERFILE, UNIT, NODE_TOML, COMPOSE, PRODUCTION_MD)):
        assert re.search("research use only", text, re.I)


def _walk(value: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _walk(v, f"{path}/{k}")]
    if isinstance(value, list):
        return [kv for n, v in enumerate(value) for kv in _walk(v, f"{path}/{n}")]
    return [(path, str(value))]


def _is_placeholder(value: str) -> bool:
    return bool(_PLACEHOLDER.fullmatch(value))


def test_no_plaintext_secrets() -> None:
    secret_key = re.compile(r"(PASSWORD|SECRET|TOKEN|PASSWD)", re.I)
    url_password = re.compile(r"://[^/:@\s]+:([^@\s]+)@")
    leaks = []
    files = {COMPOSE: _compose(), ORTHANC_JSON: json.loads(ORTHANC_JSON.read_text())}
    for source, document in files.items():
        for path, value in _walk(document):
            if secret_key.search(path.rsplit("/", 1)[-1]) and not _is_placeholder(value):
                leaks.append(f"{source.name}{path}")
            for password in url_password.findall(value):
                if not _is_placeholder(password):
                    leaks.append(f"{source.name}{path}: password in a URL")
    users = files[ORTHANC_JSON]["RegisteredUsers"]
    leaks += [f"orthanc.json user {u}" for u, pw in users.items() if not _is_placeholder(pw)]
    assert not url_password.search(load_settings(NODE_TOML, environ={}).database.url)
    assert not leaks, leaks
    # Every placeholder is listed, empty, in env.example, and compose refuses to start
    # without it (${VAR:?message}).
    used = {m for _, v in _walk(_compose()) for m in _PLACEHOLDER.findall(v)}
    example = dict(
        ln.split("=", 1)
        for ln in ENV_EXAMPLE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    )
    assert {name for name, _ in used} == set(example)
    assert all(v == "" for v in example.values())
    assert all(modifier.startswith(":?") for _, modifier in used)


# ---------------------------------------------------------------- ketanode.toml, orthanc.json


def _compose_environment() -> dict[str, str]:
    """The node's environment as compose would pass it, with the .env values filled in."""
    values = {"POSTGRES_PASSWORD": "pw123", "KETANODE_SESSION_SECRET": "s" * 64}
    env = _compose()["services"]["node"]["environment"]
    return {k: _PLACEHOLDER.sub(lambda m: values[m.group(1)], str(v)) for k, v in env.items()}


def test_production_config_loads() -> None:
    settings = load_settings(NODE_TOML, environ={})
    assert settings.node.bind_address == "0.0.0.0"
    assert settings.node.require_allowed_caller
    assert settings.database.url.startswith("postgresql://")
    assert not settings.database.auto_upgrade
    assert settings.web.enabled and not settings.model.demo_when_none_active
    for path in (settings.spool.path, settings.pipeline.work_dir, settings.reports.path):
        assert path.is_absolute() and path.is_relative_to("/var/lib/ketanode")
    # As the compose node sees it.
    env = _compose_environment()
    in_compose = load_settings(env["KETANODE_CONFIG"].replace("/etc/ketanode", str(DEPLOY)), env)
    assert in_compose.database.url == "postgresql://ketanode:pw123@postgres:5432/ketanode"
    assert in_compose.database.auto_upgrade
    assert in_compose.web.session_secret == "s" * 64
    # As the systemd unit sees it (its Environment= lines).
    unit_env = dict(e.split("=", 1) for e in _service()["Environment"])
    under_systemd = load_settings(NODE_TOML, unit_env)
    assert under_systemd.web.bind_address == "127.0.0.1"


def test_orthanc_registers_the_node_and_the_node_sends_to_orthanc() -> None:
    orthanc = json.loads(ORTHANC_JSON.read_text())
    settings = load_settings(NODE_TOML, environ={})
    assert orthanc["DicomCheckCalledAet"] is True
    assert orthanc["DicomAlwaysAllowStore"] is False
    modalities = list(orthanc["DicomModalities"].values())
    node = [m for m in modalities if m["AET"] == settings.node.ae_title]
    assert len(node) == 1, modalities
    assert node[0]["Host"] == "node" and node[0]["Port"] == settings.node.port
    assert node[0]["AllowStore"] is True
    (dest,) = settings.destinations
    assert (dest.ae_title, dest.host, dest.port) == (orthanc["DicomAet"], "orthanc", 4242)
    assert dest.port == orthanc["DicomPort"]
    assert (dest.calling_ae_title or settings.node.ae_title) == node[0]["AET"]
    callers = {c.ae_title for c in settings.node.allowed_callers}
    assert orthanc["DicomAet"] in callers


# ---------------------------------------------------------------- docs/production.md


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PRODUCTION_MD.read_text(), re.S)


def test_production_guide_certificates_work_with_the_node(tmp_path: Path) -> None:
    """Run the guide's openssl recipe, load its [node.tls] and [[destinations]] snippets with
    the files made, and make a mutual-TLS handshake with the node's own TLS contexts."""
    openssl_dir = Path(_tool("openssl")).parent
    (recipe,) = [b for b in _blocks("sh") if b.startswith("# ketanode-tls")]
    tls_dir = tmp_path / "tls"
    proc = subprocess.run(
        ["bash", "-c", recipe],
        env={"PATH": f"{openssl_dir}:/usr/bin:/bin", "DIR": str(tls_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    shutil.copy(tls_dir / "ca.crt", tls_dir / "pacs-ca.crt")
    snippets = "\n".join(b for b in _blocks("toml") if "tls" in b)
    config = tmp_path / "k.toml"
    config.write_text(snippets.replace("/etc/ketanode/tls/", f"{tls_dir}/"))
    settings = load_settings(config, environ={})
    assert settings.node.tls.enabled and settings.destinations[0].tls

    server_ctx = server_tls_context(settings.node.tls)
    dest = settings.destinations[0]
    as_pacs = client_tls_context(tls_dir / "ca.crt", tls_dir / "pacs-client.crt",
                                 tls_dir / "pacs-client.key")  # fmt: skip
    as_node = client_tls_context(dest.ca_certificates, dest.certificate, dest.private_key)
    assert _handshake(server_ctx, as_pacs) == "PACS"
    assert _handshake(server_ctx, as_node) == "ketanode.example.org"
    with pytest.raises((ssl.SSLError, OSError)):
        _handshake(server_ctx, client_tls_context(tls_dir / "ca.crt", None, None))


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str:
    """TLS over a socket pair; returns the CN of the client certificate the server saw."""
    a, b = socket.socketpair()
    seen: dict[str, Any] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as tls:
                seen["cert"] = tls.getpeercert()
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=None) as tls:
            tls.settimeout(10)
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(10)
    if "error" in seen:
        raise seen["error"]
    subject = dict(x[0] for x in seen["cert"]["subject"])
    return str(subject["commonName"])


def test_production_guide_covers_operations() -> None:
    text = PRODUCTION_MD.read_text()
    for needle in (
        "ketanode db upgrade", "pg_dump", "/metrics", "/health", "ketanode users add",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE", "[node.tls]", "DicomModalities",
        "Research use only", "docker compose", "systemctl",
    ):  # fmt: skip
        assert needle in text, f"docs/production.md does not mention {needle}"
    assert "docs/production.md" in (REPO / "README.md").read_text()
    for name in set(re.findall(r"`deploy/([\w.\-]+)`", text)) - {".env"}:
        assert (DEPLOY / name).exists(), f"docs/production.md names deploy/{name}"
    assert tomllib.loads(NODE_TOML.read_text())  # the example is what the guide refers to
