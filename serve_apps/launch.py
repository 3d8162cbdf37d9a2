"""Start and stop the application from Python: ``meddr-ray serve`` (:func:`run_serve`), the demo and the tests
(:func:`start` / :func:`stop`).

The application is the same one ``serve run serve_apps/meddr.yaml`` starts; here it runs on the cluster
:func:`meddr_ray.stages.runtime.init_ray` joins or starts, with Serve's HTTP proxy on ``serve.host:serve.port``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from meddr_ray.config import Config, ConfigError
from meddr_ray.retrieval.store import current_version
from meddr_ray.stages.runtime import init_ray

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningApp:
    """A started application: where to send requests and which variable holds the token."""

    name: str
    url: str
    token_env: str


def start(
    cfg: Config, *, token: Optional[str] = None, user_configs: Optional[Dict[str, Dict[str, Any]]] = None
) -> RunningApp:
    """Deploy the application and return once every deployment is up (non-blocking: it keeps running).

    ``token``: the API token to accept (the demo and the tests make one); default: the variable
    ``serve.auth_token_env``, which must then be set (a service open to anyone is never the default).
    ``user_configs``: the ``Generator`` / ``Retriever`` ``user_config`` (:func:`serve_apps.meddr.build`).

    Called again with the same ``serve.app_name`` it redeploys the running application: Serve starts the new
    replicas (``max_surge_percent``) and stops the old ones once those serve; requests keep being answered."""
    from ray import serve

    from serve_apps.ingress import token_sha256
    from serve_apps.meddr import build

    s = cfg.serve
    if token is None and not os.environ.get(s.auth_token_env, "").strip():
        raise ConfigError(
            f"no API token: export {s.auth_token_env}=<token> first (serve.auth_token_env names the variable), "
            f"e.g. export {s.auth_token_env}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    index_dir = cfg.layout.index_dir
    if cfg.serve.index_version is None and current_version(index_dir) is None:
        raise FileNotFoundError(
            f"no published index in {index_dir} (its CURRENT file is missing): build it first with "
            f"`meddr-ray index --config {cfg.preset}` or the whole `meddr-ray pipeline --config {cfg.preset}`"
        )
    init_ray(cfg)
    # Serve's HTTP options are fixed when Serve first starts on a cluster; later calls keep the running ones.
    serve.start(http_options={"host": s.host, "port": s.port})
    app = build(cfg, auth_sha256=token_sha256(token) if token else None, user_configs=user_configs)
    serve.run(app, name=s.app_name, route_prefix=s.route_prefix)
    _wait_for_old_replicas_to_stop(s.app_name)
    return RunningApp(s.app_name, app_url(cfg), s.auth_token_env)


def _wait_for_old_replicas_to_stop(app_name: str, timeout_s: float = 60.0) -> None:
    """Wait until no replica of ``app_name`` is STOPPING. ``serve.run`` returns once the new replicas serve, while
    the old ones may still be draining and the proxy may still route a new request to one; a redeploy is done,
    for a caller that then expects the new version to answer, once they are gone. (STARTING replicas are new
    ones, e.g. an autoscaling step, and are not waited for.)"""
    from ray import serve

    deadline = time.time() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        stopping = {} if app is None else {
            name: n for name, d in app.deployments.items()
            for state, n in d.replica_states.items() if str(getattr(state, "value", state)) == "STOPPING" and n
        }
        if not stopping:
            return
        if time.time() > deadline:
            logger.warning("%s: replicas still stopping %.0f s after the redeploy: %s", app_name, timeout_s, stopping)
            return
        time.sleep(0.25)


def stop(app_or_name) -> None:
    """Delete the application (Serve and the cluster keep running)."""
    from ray import serve

    serve.delete(app_or_name.name if isinstance(app_or_name, RunningApp) else app_or_name)


_started: List[str] = []  # names of the applications start_app started in this process, for stop_app


def start_app(cfg: Config, token: Optional[str] = None) -> str:
    """:func:`start` for scripts and the demo: deploy the application, return its URL (it keeps running)."""
    app = start(cfg, token=token)
    _started.append(app.name)
    return app.url


def stop_app(name: Optional[str] = None) -> None:
    """Delete the application ``name`` (default: the last one :func:`start_app` started here, else ``meddr``)."""
    stop(name or (_started.pop() if _started else "meddr"))


def app_url(cfg: Config) -> str:
    """``http://host:port/prefix`` of the running Serve proxy (its port may differ from ``serve.port`` when Serve
    was already running on the cluster)."""
    host, port = cfg.serve.host, cfg.serve.port
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is not None:
            host, port = client.http_config.host or host, client.http_config.port
    except Exception:  # a private API; the configured values are the fallback
        pass
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}{cfg.serve.route_prefix.rstrip('/')}"


def run_serve(cfg: Config, detach: bool = False) -> None:
    """``meddr-ray serve``: start the application, print where it answers, serve until Ctrl-C (``detach``: return
    at once and leave it running, as a Ray job that deploys it does)."""
    from ray import serve

    joined = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))  # a cluster others may serve on too
    app = start(cfg)
    print(
        f"MedDr is serving at {app.url} (application {app.name!r}); send the token in ${app.token_env}:\n"
        f"  curl -H \"Authorization: Bearer ${app.token_env}\" {app.url}/v1/models",
        flush=True,
    )
    if detach:
        return
    print("Ctrl-C (or SIGTERM) stops it.", flush=True)
    # SIGTERM (kill, systemd, a Kubernetes pod's stop) takes the same orderly way out as Ctrl-C
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop(app)
        if not joined:
            serve.shutdown()  # our own local cluster: take Serve's controller and proxies down with it
        print("stopped", flush=True)
