"""Settings: the example file documents every key with its default; errors name file and key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from ketanode.config import ConfigError, Settings, load_settings
from tests.support import REPO

EXAMPLE = REPO / "config.example.toml"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _keys(ann, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _flatten(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for name, value in data.items():
        if isinstance(value, dict):
            keys |= _flatten(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    documented = _flatten(tomllib.loads(text))
    # keys that are optional paths appear commented out, with their name
    commented = {k for k in _keys(Settings) if f"# {k.rsplit('.', 1)[-1]} = " in text}
    missing = _keys(Settings) - documented - commented
    assert not missing, f"config.example.toml does not document: {sorted(missing)}"


def test_example_equals_embedded_defaults() -> None:
    assert load_settings(EXAMPLE, environ={}) == Settings()


def test_environment_overrides_file(tmp_path: Path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text('[node]\nport = 4242\nae_title = "FROMFILE"\n')
    s = load_settings(
        cfg,
        environ={
            "KETANODE__NODE__PORT": "5151",
            "KETANODE__SERIES__SELECTION__MIN_SLICES": "120",
            "KETANODE__NODE__ALLOWED_CALLERS": '[{"ae_title": "MRI1"}]',
        },
    )
    assert s.node.port == 5151
    assert s.node.ae_title == "FROMFILE"
    assert s.series.selection.min_slices == 120
    assert [c.ae_title for c in s.node.allowed_callers] == ["MRI1"]


@pytest.mark.parametrize(
    ("body", "key", "expected"),
    [
        ("[node]\nport = 70000\n", "node.port", "less than or equal to 65535"),
        ('[node]\nae_title = "A\\\\B"\n', "node.ae_title", "AE title"),
        ('[node]\nae_titel = "X"\n', "node.ae_titel", "unknown key"),
        ('[series]\ngrace_seconds = "soon"\n', "series.grace_seconds", "valid number"),
        (
            '[series.selection]\ninclude_pattern = "(("\n',
            "series.selection.include_pattern",
            "regular expression",
        ),
        ('[database]\nurl = "mysql://x"\n', "database.url", "sqlite"),
        (
            '[[node.allowed_callers]]\naddress = "10.0.0.1"\n',
            "node.allowed_callers[0].ae_title",
            "required",
        ),
        ("[node.tls]\nenabled = true\n", "node.tls", "certificate is required"),
        ('[node]\nreceiver = "storescp"\n', "node.receiver", "'pynetdicom' or 'dcmtk'"),
    ],
)
def test_bad_value_names_file_and_key(tmp_path: Path, body: str, key: str, expected: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    message = str(info.value)
    assert str(cfg) in message
    assert f"'{key}'" in message
    assert expected.lower() in message.lower()


def test_bad_environment_value_names_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={"KETANODE__NODE__PORT": "eleven"})
    assert "KETANODE__NODE__PORT" in str(info.value)
    assert "'node.port'" in str(info.value)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text("[node\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg, environ={})
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_cli_refuses_to_start_half_configured(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "bad.toml"
    cfg.write_text("[pipeline]\nworkers = 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ketanode", "--config", str(cfg), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "pipeline.workers" in proc.stderr and str(cfg) in proc.stderr.replace("\n", "")
    assert not (tmp_path / "ketanode-data").exists()


def test_the_demonstration_model_is_off_unless_switched_on(tmp_path: Path) -> None:
    """Issue 12, item 3: ``serve`` never scores with the demonstration model by default (nor
    with the example settings); the embedded ``ketanode demo`` switches it on."""
    from ketanode.cli.demo import demo_settings

    assert Settings().model.demo_when_none_active is False
    assert load_settings(EXAMPLE, environ={}).model.demo_when_none_active is False
    assert demo_settings(tmp_path).model.demo_when_none_active is True


def test_native_front_end_without_tls_is_refused_with_tls(tmp_path: Path) -> None:
    """The native front end has no TLS: asking for both names the keys."""
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    cfg = tmp_path / "fe.toml"
    cfg.write_text(
        '[node]\nreceiver = "dcmtk"\n[node.tls]\nenabled = true\n'
        f'certificate = "{tmp_path / "cert.pem"}"\nprivate_key = "{tmp_path / "key.pem"}"\n'
        "require_client_certificate = false\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert str(cfg) in str(info.value)
    assert "node.receiver = 'dcmtk' does not support node.tls" in str(info.value)


def test_serve_names_a_missing_front_end_program(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "fe.toml"
    cfg.write_text(
        f'[node]\nport = 0\nreceiver = "dcmtk"\nreceiver_program = "{tmp_path / "no-scp"}"\n'
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "k.db"}"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ketanode", "--config", str(cfg), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "node.receiver_program" in proc.stderr and "no-scp" in proc.stderr
    assert "build-frontend.sh" in proc.stderr
