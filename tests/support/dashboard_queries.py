"""Extract the PromQL of a Grafana dashboard so it can be run against a plain Prometheus.

``dashboard_queries(path)`` returns ``(panel title, expr)`` for every target of every
panel, including panels nested in collapsed rows, with Grafana's macros and template
variables replaced by values Prometheus' ``/api/v1/query`` understands.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Grafana's built-in interval/range macros, as plain Prometheus durations/numbers.
MACROS: dict[str, str] = {
    "__rate_interval": "30s",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}

# $name, ${name}, ${name:format}, [[name]], [[name:format]]
_VARIABLE = re.compile(
    r"\$\{(?P<braced>\w+)(?::[^}]*)?\}"
    r"|\[\[(?P<bracketed>\w+)(?::[^\]]*)?\]\]"
    r"|\$(?P<plain>\w+)"
)

_ANY = ".+"


def _variable_value(variable: dict[str, Any]) -> str:
    """The value a template variable has by default, usable inside a PromQL matcher."""
    all_value = variable.get("allValue") or _ANY
    current = variable.get("current") or {}
    value = current.get("value")
    if value is None and variable.get("type") in {"constant", "custom", "textbox"}:
        value = variable.get("query")
    values = value if isinstance(value, list) else [value]
    values = [v for v in values if v not in (None, "")]
    if not values or "$__all" in values or ("All" in values and variable.get("includeAll")):
        return all_value
    if len(values) == 1:
        return str(values[0])
    return "(" + "|".join(re.escape(str(v)) for v in values) + ")"


def _variables(dashboard: dict[str, Any]) -> dict[str, str]:
    templating = dashboard.get("templating") or {}
    return {
        v["name"]: _variable_value(v)
        for v in templating.get("list", [])
        if v.get("name") and v.get("type") != "datasource"
    }


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana macros and template variables in ``expr``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bracketed") or match.group("plain")
        if name in MACROS:
            return MACROS[name]
        if name in variables:
            return variables[name]
        raise KeyError(f"unknown Grafana variable ${name} in query: {expr}")

    return _VARIABLE.sub(replace, expr)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        # rows keep their children in "panels" while collapsed
        yield from _panels(panel.get("panels") or [])


def dashboard_queries(path: str | Path) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of every panel of the dashboard at ``path``."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    variables = _variables(dashboard)
    queries: list[tuple[str, str]] = []
    for panel in _panels(dashboard.get("panels") or []):
        for target in panel.get("targets") or []:
            expr = target.get("expr")
            if expr:
                queries.append((panel.get("title", ""), substitute(expr, variables)))
    return queries


if __name__ == "__main__":  # pragma: no cover - handy for a quick look
    import sys

    for title, query in dashboard_queries(sys.argv[1]):
        print(f"# {title}\n{query}\n")
