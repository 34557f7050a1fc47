"""What every request handler of the dashboard shares: settings, database, timers, templates."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from ketanode import __version__
from ketanode.config import Settings
from ketanode.scheduler import Timers
from ketanode.texts import RESEARCH_USE_ONLY

if TYPE_CHECKING:
    from ketanode.cluster.status import ClusterReader

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

DEMO_MARKER = "DEMONSTRATION MODEL (synthetic)"


@dataclass
class WebContext:
    settings: Settings
    sessions: sessionmaker[Session]
    timers: Timers | None
    templates: Jinja2Templates
    # the session cookie carries the Secure flag (HTTPS)
    tls: bool
    # cluster mode (the web role): the cluster's status, for /cluster, /metrics and /health
    cluster: ClusterReader | None = None


def _when(value: Any) -> str:
    """A timestamp (datetime or ISO text) as ``YYYY-MM-DD HH:MM:SS`` UTC; empty for None."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
        return str(value.strftime("%Y-%m-%d %H:%M:%S"))
    return str(value)


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    env = templates.env
    env.filters["when"] = _when
    env.filters["num"] = _num
    env.globals["RESEARCH_USE_ONLY"] = RESEARCH_USE_ONLY
    env.globals["DEMO_MARKER"] = DEMO_MARKER
    env.globals["version"] = __version__
    return templates


def context_of(request: Request) -> WebContext:
    ctx = request.app.state.ketanode
    assert isinstance(ctx, WebContext)
    return ctx


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on first use), which every POST form carries."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(24)
        request.session["csrf"] = token
    return token


def render(request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    """A page from ``templates/``; every page gets the user (if any) and the CSRF token for
    the logout form."""
    ctx = context_of(request)
    values.setdefault("user", getattr(request.state, "user", None))
    values["csrf"] = csrf_token(request)
    values["path"] = request.url.path
    values["cluster_mode"] = ctx.cluster is not None
    return ctx.templates.TemplateResponse(request, template, values, status_code=status_code)
