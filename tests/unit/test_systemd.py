"""The systemd unit: what it runs, how it stops, how it is locked down, that systemd takes it."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cognigy_offload.config import load_config
from cognigy_offload.systemd import SERVICE_USER, render_unit

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def settings(unit: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, by key (a key may repeat)."""
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def write_config(directory: Path, text: str = "") -> Path:
    """A config.toml holding ``text`` (every key it leaves out takes its default)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text(text)
    return path


def verify(unit: str, directory: Path) -> str:
    """Run ``systemd-analyze verify`` on ``unit`` and return what it complained about."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # The cognigy-offload user exists only on a prepared host: verify a copy that runs
    # as the current user. Only the User=/Group= lines differ from the real unit.
    me = getpass.getuser()
    local = re.sub(r"^(User|Group)=.*$", rf"\1={me}", unit, flags=re.MULTILINE)
    path = directory / "cognigy-offload.service"
    path.write_text(local)
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=directory,
    )
    # verify warns (exit 0) about unknown keys and bad values: any output is a finding.
    return (done.stdout + done.stderr).strip() + (
        f"\nexit {done.returncode}" * bool(done.returncode)
    )


def test_unit_runs_this_python_with_the_absolute_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ExecStart is this interpreter running `serve --config <absolute path>` as its own user."""
    config = write_config(tmp_path / "etc")
    monkeypatch.chdir(tmp_path)
    unit = render_unit(Path("etc/config.toml"))
    found = settings(unit)
    assert found["ExecStart"] == [
        f"{Path(sys.executable).absolute()} -m cognigy_offload serve --config {config}"
    ]
    assert found["User"] == found["Group"] == [SERVICE_USER]
    assert found["WorkingDirectory"] == [str(config.parent)]
    assert found["EnvironmentFile"] == ["/etc/cognigy-offload/env"]
    assert found["Restart"] == ["on-failure"]
    assert found["KillSignal"] == ["SIGTERM"]
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectHome",
        "ProtectKernelTunables",
        "ProtectControlGroups",
        "RestrictSUIDSGID",
        "LockPersonality",
    ):
        assert found[key] == ["yes"], key
    assert found["ProtectSystem"] == ["strict"]
    # database.data_dir is relative in the shipped config: made absolute against WorkingDirectory.
    assert found["ReadWritePaths"] == [f"-{config.parent / '.cognigy_offload/pg'}"]


def test_stop_timeout_covers_the_drain_of_the_config(tmp_path: Path) -> None:
    """TimeoutStopSec exceeds shutdown_grace_s + max_wait_s as configured, else the defaults."""
    config = write_config(tmp_path, "[server]\nshutdown_grace_s = 100\nmax_wait_s = 12\n")
    assert load_config(config, environ={}).server.shutdown_grace_s == 100
    stop_s = int(settings(render_unit(config))["TimeoutStopSec"][0].removesuffix("s"))
    assert stop_s > 112

    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nno_such_key = 1\n")
    unit = render_unit(broken)
    assert "server.no_such_key: unknown key" in unit  # says why the defaults were used
    stop_s = int(settings(unit)["TimeoutStopSec"][0].removesuffix("s"))
    assert stop_s > 20 + 5


def test_rendered_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing to complain about, even with odd characters in paths."""
    odd = tmp_path / "with space%and$dollar"
    config = write_config(odd, "[server]\nport = 443\n")
    unit = render_unit(config)
    assert "CAP_NET_BIND_SERVICE" in unit  # a port below 1024 needs the capability
    assert verify(unit, tmp_path) == ""


def test_shipped_example_is_the_rendering_of_the_deploy_config(tmp_path: Path) -> None:
    """deploy/cognigy-offload.service is what render_unit makes of deploy/config.toml today."""
    config = load_config(DEPLOY / "config.toml", environ={})
    expected = render_unit(
        Path("/etc/cognigy-offload/config.toml"),
        executable="/opt/cognigy-offload/venv/bin/python",
        config=config,
    )
    assert (DEPLOY / "cognigy-offload.service").read_text() == expected, (
        "regenerate deploy/cognigy-offload.service (see README, Operations)"
    )
    found = settings(expected)
    assert found["StateDirectory"] == ["cognigy-offload"]  # creates /var/lib/cognigy-offload
    # The example names no secret, only the variables that hold them.
    example = (DEPLOY / "env.example").read_text()
    assignments = re.findall(r"^#?\s*([A-Z_]+)=(.*)$", example, re.MULTILINE)
    assert {name for name, _ in assignments} >= {
        "COGNIGY_OFFLOAD_WEBHOOK_TOKEN",
        "COGNIGY_CLIENT_SECRET",
        "COGNIGY_API_KEY",
        "COGNIGY_OFFLOAD__DATABASE__DSN",
    }
    secrets = {"COGNIGY_OFFLOAD_WEBHOOK_TOKEN", "COGNIGY_CLIENT_SECRET", "COGNIGY_API_KEY"}
    assert all(value == "" for name, value in assignments if name in secrets)


def test_cli_prints_the_unit(tmp_path: Path) -> None:
    """`python -m cognigy_offload systemd-unit --config PATH` prints render_unit's text."""
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGNIGY_OFFLOAD")}
    done = subprocess.run(
        [sys.executable, "-m", "cognigy_offload", "systemd-unit", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == render_unit(config) + "\n"
