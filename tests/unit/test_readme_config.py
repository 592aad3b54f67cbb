"""README.md stays true to the code: the configuration table and the metrics table."""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client.metrics import MetricWrapperBase

from cognigy_offload import config
from cognigy_offload.metrics import Metrics

README = Path(__file__).resolve().parent.parent.parent / "README.md"
SECTIONS: dict[str, type[msgspec.Struct]] = {
    "server": config.ServerConfig,
    "queue": config.QueueConfig,
    "database": config.DatabaseConfig,
    "cognigy": config.CognigyConfig,
    "cognigy.auth": config.AuthConfig,
    "queries.NAME": config.QueryConfig,
}
TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def section_text(title: str) -> str:
    """The README text under the heading ``title`` up to the next heading of its level."""
    text = README.read_text()
    match = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^\1 |\Z)", text, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(2)


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the markdown tables in ``text``."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            rows.append([cell.strip() for cell in cells])
    return rows


def type_name(annotation: Any) -> str:
    """How the README names a config type."""
    if typing.get_origin(annotation) is typing.Literal:
        return "one of: " + ", ".join(typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return f"list of {TYPE_NAMES[item]}s"
    return TYPE_NAMES[annotation]


def expected_rows() -> dict[str, tuple[str, Any]]:
    """key -> (type name, default) for every key of every config struct."""
    expected: dict[str, tuple[str, Any]] = {}
    for section, struct in SECTIONS.items():
        for field in msgspec.structs.fields(struct):
            if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
                continue  # a nested section ([cognigy.auth]), listed on its own
            if field.default is not msgspec.NODEFAULT:
                default = field.default
            elif field.default_factory is not msgspec.NODEFAULT:
                default = field.default_factory()
            else:
                default = "(required)"
            expected[f"{section}.{field.name}"] = (type_name(field.type), default)
    return expected


def test_config_table_lists_every_key_with_its_type_and_default() -> None:
    """Every key of config.py is in the README table once, with its type and default, and
    the table names no key that config.py does not have."""
    documented: dict[str, tuple[str, Any]] = {}
    for key, type_cell, default_cell, meaning in table_rows(
        section_text("Configuration reference")
    ):
        name = key.strip("`")
        assert name not in documented, f"{name} is listed twice"
        assert meaning, f"{name} has no meaning"
        if default_cell == "(required)":
            default: Any = default_cell
        else:
            default = tomllib.loads(f"v = {default_cell.strip('`')}")["v"]
        documented[name] = (type_cell, default)
    expected = expected_rows()
    missing = sorted(expected.keys() - documented.keys())
    unknown = sorted(documented.keys() - expected.keys())
    assert not missing, f"README lacks config keys: {missing}"
    assert not unknown, f"README lists keys config.py does not have: {unknown}"
    for key, (type_cell, default) in expected.items():
        assert documented[key][0] == type_cell, f"{key}: type should read {type_cell!r}"
        assert documented[key][1] == default, f"{key}: default should be {default!r}"


def test_metrics_table_lists_every_exported_series() -> None:
    """The README's metrics table names exactly the series /metrics exports, with their labels."""
    exported: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            # prometheus-client has no public accessor for a metric's label names.
            name = metric._name + ("_total" if metric._type == "counter" else "")
            exported[name] = set(metric._labelnames)
    documented = {
        row[0].strip("`"): {cell.strip("` ") for cell in row[1].split(",") if cell.strip()}
        for row in table_rows(section_text("Metrics"))
    }
    assert sorted(documented) == sorted(exported)
    for name, labels in documented.items():
        assert labels == exported[name], f"{name}: labels should be {sorted(exported[name])}"
