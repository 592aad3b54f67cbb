"""A hardened systemd unit for ``python -m cognigy_offload serve`` (the ``systemd-unit`` command).

The unit runs this very interpreter (``sys.executable``, usually a virtualenv's python)
as a dedicated user, reads secrets from an EnvironmentFile, gives the service enough
time to drain on SIGTERM and locks the file system down to the data directory.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import Config, load_config
from .errors import ConfigError

SERVICE_NAME = "cognigy-offload"
SERVICE_USER = "cognigy-offload"
ENV_FILE = Path("/etc/cognigy-offload/env")
# On top of drain grace + inline waits: releasing unstarted jobs, closing the pool and,
# with an embedded PostgreSQL, stopping it (app._drain / open_database bound each step).
STOP_MARGIN_S = 30
# Exit status of a configuration error (__main__.main): restarting cannot fix it.
CONFIG_ERROR_EXIT = 2
STATE_ROOT = Path("/var/lib")
_HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))


def _quote(arg: str) -> str:
    """One ExecStart argument, escaped for systemd (specifiers, variables, spaces)."""
    escaped = arg.replace("\\", "\\\\").replace("%", "%%").replace("$", "$$")
    if any(c.isspace() for c in escaped) or '"' in escaped or not escaped:
        return '"' + escaped.replace('"', '\\"') + '"'
    return escaped


def _path_value(path: Path, prefix: str = "") -> str:
    """A path for a path-valued setting: ``%`` is a specifier, spaces need quoting."""
    text = prefix + str(path).replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def render_unit(
    config_path: Path,
    *,
    executable: str | None = None,
    config: Config | None = None,
    user: str = SERVICE_USER,
) -> str:
    """The text of cognigy-offload.service for the config at ``config_path``.

    ``config`` is read from ``config_path`` unless given (the shipped example renders a
    path that exists only on the target machine); ``executable`` defaults to this python.
    """
    config_file = Path(config_path).expanduser().absolute()
    if config is not None:
        note = f"# Rendered for {config_file}."
    else:
        try:
            config = load_config(config_file)
            note = f"# Rendered from {config_file}."
        except ConfigError as exc:
            # The unit is often rendered before the config is finished: use the defaults.
            why = " ".join("; ".join(exc.problems).split())
            config = Config()
            note = f"# {config_file} did not load ({why}): defaults used."
    python = Path(executable or sys.executable).absolute()
    workdir = config_file.parent
    # EmbeddedPostgres resolves data_dir against the working directory, as the unit sets it.
    data_dir = Path(config.database.data_dir).expanduser()
    if not data_dir.is_absolute():
        data_dir = workdir / data_dir
    stop_s = math.ceil(config.server.shutdown_grace_s + config.server.max_wait_s) + STOP_MARGIN_S
    exec_start = " ".join(
        _quote(a)
        for a in (str(python), "-m", "cognigy_offload", "serve", "--config", str(config_file))
    )
    # ProtectHome=yes hides /home entirely; an install living there needs read-only.
    in_home = _under(python, _HOME_DIRS) or _under(workdir, _HOME_DIRS)
    lines = [
        "# cognigy-offload: accepts Cognigy.AI webhooks, runs PostgreSQL aggregations in the",
        "# background and pushes the results back into the conversation.",
        note,
        "# Regenerate with: python -m cognigy_offload systemd-unit --config PATH",
        "",
        "[Unit]",
        "Description=cognigy-offload (Cognigy.AI webhook offload service)",
        "Wants=network-online.target",
        # Ordering only: with a system PostgreSQL on this host it starts first.
        "After=network-online.target postgresql.service",
        "",
        "[Service]",
        "Type=exec",
        f"User={user}",
        f"Group={user}",
        # WorkingDirectory= takes the rest of the line as is: no quotes, only specifiers.
        f"WorkingDirectory={str(workdir).replace('%', '%%')}",
        f"EnvironmentFile={ENV_FILE}",
        "Environment=PYTHONUNBUFFERED=1",
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        "RestartSec=5s",
        f"RestartPreventExitStatus={CONFIG_ERROR_EXIT}",
        # SIGTERM to the service only: it drains, then stops an embedded PostgreSQL itself.
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={stop_s}s",
        "TimeoutStartSec=90s",
        "",
        "# Hardening (none of it gets in the way of CPython, asyncpg or uvloop).",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ProtectHome={'read-only' if in_home else 'yes'}",
        # "-": a missing data dir is fine while a system PostgreSQL is used (database.dsn).
        f"ReadWritePaths={_path_value(data_dir, '-')}",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictSUIDSGID=yes",
        "RestrictRealtime=yes",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
        "UMask=0077",
        # MemoryDenyWriteExecute= is left out on purpose: libffi (ctypes, cffi) needs W+X pages.
    ]
    if _under(data_dir, (STATE_ROOT,)) and data_dir != STATE_ROOT:
        # systemd creates it owned by the service user before the file system is locked.
        state = data_dir.relative_to(STATE_ROOT).parts[0]
        lines += [f"StateDirectory={state}", "StateDirectoryMode=0750"]
    if config.server.port < 1024:
        lines += [
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        ]
    else:
        lines.append("CapabilityBoundingSet=")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)
