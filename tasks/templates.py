"""The route's Jinja environment: templates/ with the quoting each format needs.

Every rendered file (service definitions, supervisord.conf, the
boot-time tuning daemon) goes through `render`, so quoting rules live here once.
"""

from __future__ import annotations

import json
import shlex

import jinja2

from tasks.common import REPO


def systemd_quote(arg: str) -> str:
    """One argument of a systemd ExecStart= line (quoted, % escaped, when needed)."""
    if arg and all(c.isalnum() or c in "-_./:=@+," for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def supervisor_quote(arg: str) -> str:
    """One argument of a supervisor `command=` line (shell quoting, % escaped)."""
    return shlex.quote(arg).replace("%", "%%")


TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(REPO / "templates"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)
TEMPLATES.filters["supervisor_quote"] = supervisor_quote
TEMPLATES.filters["systemd_quote"] = systemd_quote
TEMPLATES.filters["tojson"] = json.dumps


def render(template: str, **context) -> str:
    """Render one of templates/ with the route's Jinja environment."""
    return TEMPLATES.get_template(template).render(**context)
