"""optuna-dashboard on a cnnsearch storage, and the study note it shows.

`open_dashboard` binds the server itself (a busy port is one DashboardError, and the caller
learns the real address before serving starts); `describe_study` writes the spec's description
as the study's note when `search.study.create` makes a study.
"""

from __future__ import annotations

import ipaddress
import warnings
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

import search
from search.errors import DashboardError
from search.storage import Store, open_store


def describe_study(study: optuna.Study, spec) -> None:
    """Store the spec's description as the study's optuna-dashboard note (Markdown), and name
    its objective after the metric (the dashboard would say "Objective 0")."""
    from optuna_dashboard import save_note

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in spec.objectives])
    searched = ", ".join(f"`{p.name}`" for p in spec.space) or "nothing"
    data = spec.data.get("dataset", "digits")
    save_note(study, f"{spec.description or spec.name}\n\n"
                     f"{', '.join(f'**{o.name}** ({o.direction})' for o in spec.objectives)}, budget {spec.n_trials} trials, dataset **{data}**; "
                     f"searched: {searched}.\n\n"
                     f"Created by cnnsearch {search.__version__}. `cnnsearch export {spec.name} -o best.json` "
                     "writes the best config.\n")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (one line per request would flood the terminal)
        pass


@dataclass
class Dashboard:
    server: WSGIServer
    url: str
    loopback: bool

    def serve_forever(self) -> None:
        try:
            self.server.serve_forever()
        finally:
            self.server.server_close()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_dashboard(store: Store | str | None = None, host: str = "127.0.0.1", port: int = 8080) -> Dashboard:
    """optuna-dashboard's WSGI app on `store`, bound to host:port (port 0: any free port).

    Binding here rather than in `optuna_dashboard.run_server` makes a busy port one clear error
    and gives the caller the real address before serving starts.
    """
    import optuna_dashboard

    app = optuna_dashboard.wsgi(open_store(store, heartbeat_interval=None, create=False).storage)
    server_class = WSGIServer
    if ":" in host:
        import socket

        server_class = type("WSGIServer6", (WSGIServer,), {"address_family": socket.AF_INET6})
    try:
        server = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as exc:
        raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    shown = f"[{host}]" if ":" in host else host
    return Dashboard(server, f"http://{shown}:{server.server_port}/dashboard", is_loopback(host))
