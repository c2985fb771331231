"""Render the supervisord config of one node from deploy/templates/supervisord.conf.j2 (deploy CLI process).

supervisord expands `%(...)s` in values, so a literal `%` in a command is written `%%`;
arguments are shell-quoted because supervisord splits `command=` with shlex.
"""

from __future__ import annotations

import os
import shlex

import jinja2

from glmserve.deploy.plan import FleetSpec, Program, plan

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def _command(p: Program) -> str:
    return _escape(" ".join(shlex.quote(a) for a in p.argv))


def _environment(p: Program) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in p.env)


def render(spec: FleetSpec, conf_path: str, layout: str = "") -> str:
    """The supervisord.conf text for `spec` (not written)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    programs = [dict(name=p.name, command=_command(p), env=_environment(p), priority=p.priority,
                     startsecs=p.startsecs, is_worker=p.is_worker) for p in plan(spec)]
    layout = layout or ("cpu demo" if spec.device == "cpu" else "gpu node")
    return env.get_template("supervisord.conf.j2").render(
        programs=programs, state_dir=spec.state_dir, log_dir=os.path.join(spec.state_dir, "logs"),
        workdir=spec.workdir, conf_path=conf_path, layout=layout, start_retries=spec.start_retries)


def write_config(spec: FleetSpec, conf_path: str) -> str:
    os.makedirs(os.path.join(spec.state_dir, "logs"), exist_ok=True)
    with open(conf_path, "w") as f:
        f.write(render(spec, conf_path))
    return conf_path
