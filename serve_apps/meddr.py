"""The application builder: ``serve_apps.meddr:build_app`` is what ``serve run`` / ``serve deploy`` (and a
KubeRay RayService) import, with ``args: {config: PRESET_OR_FILE, overrides: ["key=value", ...]}``.

Every deployment option comes from the config's ``serve`` section (``meddr_ray/config.py``, ``ServeConfig``); a
Serve config file's own ``deployments:`` entries still override them, as Serve always allows.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from meddr_ray.config import Config, ConfigError, ServeDeploymentConfig, load_config
from serve_apps.generator import Generator
from serve_apps.ingress import Ingress, token_sha256
from serve_apps.launch import start_app, stop_app  # from Python (the demo, scripts): start_app(cfg) -> URL
from serve_apps.retriever import Retriever


class AppArgs(BaseModel):
    """The builder's arguments (``args:`` of an application in a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    config: str = "demo"
    """A preset name (tiny, demo, paper) or a YAML config file."""
    overrides: List[str] = []
    """``key=value`` overrides, as on the command line (``run_dir=/shared/runs/demo``)."""


__all__ = ["AppArgs", "build", "build_app", "check", "deployment_options", "start_app", "stop_app"]


def build_app(args: Union[AppArgs, Dict[str, Any], None] = None) -> Application:
    """``serve run serve_apps.meddr:build_app config=demo`` / the ``import_path`` of ``serve_apps/meddr.yaml``."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    return build(load_config(parsed.config, parsed.overrides))


def build(
    cfg: Config, *, auth_sha256: Optional[str] = None, user_configs: Optional[Dict[str, Dict[str, Any]]] = None
) -> Application:
    """Ingress -> Generator -> Retriever with the options of ``cfg.serve``.

    ``auth_sha256``: the SHA-256 of the API token; default: of the variable ``serve.auth_token_env`` here, if set
    (else the ingress reads it on its own node and refuses to start without it). ``user_configs``: deployment name
    -> ``user_config`` (``{"Generator": {"adapter_dir": ...}, "Retriever": {"index_version": ...}}``), what a Serve
    config file's ``deployments:`` entries would set; each replica applies it in ``reconfigure``."""
    check(cfg)
    s = cfg.serve
    if auth_sha256 is None and os.environ.get(s.auth_token_env, "").strip():
        auth_sha256 = token_sha256(os.environ[s.auth_token_env].strip())
    user_configs = dict(user_configs or {})
    unknown = sorted(set(user_configs) - {"Generator", "Retriever"})
    if unknown:
        raise ValueError(f"user_configs: {unknown} take none; Generator and Retriever do (their reconfigure)")

    def options(name: str, section: ServeDeploymentConfig) -> Dict[str, Any]:
        extra = {"user_config": user_configs[name]} if name in user_configs else {}
        return {**deployment_options(section), **extra}

    retriever = Retriever.options(**options("Retriever", s.retriever)).bind(cfg)
    generator = Generator.options(**options("Generator", s.generator)).bind(retriever, cfg)
    return Ingress.options(**options("Ingress", s.ingress)).bind(generator, cfg, auth_sha256)


def deployment_options(d: ServeDeploymentConfig) -> Dict[str, Any]:
    """``@serve.deployment`` options of one ``serve.<deployment>`` section."""
    return {
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        "autoscaling_config": {
            "min_replicas": d.min_replicas,
            "max_replicas": d.max_replicas,
            "target_ongoing_requests": d.target_ongoing_requests,
            "upscale_delay_s": d.upscale_delay_s,
            "downscale_delay_s": d.downscale_delay_s,
        },
        "max_ongoing_requests": d.max_ongoing_requests,
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "max_surge_percent": d.max_surge_percent,
    }


def check(cfg: Config) -> None:
    """Settings Serve would accept but that cannot work; a :class:`ConfigError` naming the key."""
    s = cfg.serve
    for name in ("ingress", "generator", "retriever"):
        d: ServeDeploymentConfig = getattr(s, name)
        if not 0 <= d.min_replicas <= d.max_replicas or d.max_replicas < 1:
            raise ConfigError(f"key 'serve.{name}': need 0 <= min_replicas <= max_replicas, max_replicas >= 1")
        if d.num_cpus < 0 or d.num_gpus < 0:
            raise ConfigError(f"key 'serve.{name}': num_cpus and num_gpus must be >= 0")
    if s.generator.max_ongoing_requests < s.max_batch_size:
        raise ConfigError(
            f"key 'serve.generator.max_ongoing_requests': {s.generator.max_ongoing_requests} is below "
            f"serve.max_batch_size={s.max_batch_size}, so a batch could never fill"
        )
    if s.max_image_bytes > s.max_body_bytes:
        raise ConfigError("key 'serve.max_image_bytes': larger than serve.max_body_bytes, which would refuse it first")
