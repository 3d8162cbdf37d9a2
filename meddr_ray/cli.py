"""``meddr-ray <stage> --config PRESET_OR_FILE key=value ...``: one entry point over the stage functions.

The stages come from the one registry (:data:`meddr_ray.stages.registry.STAGES`); ``serve`` and ``demo`` are the
two commands above them. Library code reports progress through :mod:`meddr_ray.progress`; this module decides
what a person sees: those lines (or none, with ``--quiet``) and each stage's headline and output folder.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Callable, Dict, List, Optional, Tuple

from meddr_ray import progress
from meddr_ray.config import ConfigError, available_presets, load_config, with_added_index_source
from meddr_ray.stages.registry import STAGES, Stage, StageNotBuilt, StageResult

COMMANDS: Dict[str, Stage] = {
    **STAGES,
    "serve": Stage("serve", "serve_apps.launch:run_serve",
                   "start the Ray Serve application (HTTP API) and serve until Ctrl-C"),
    "demo": Stage("demo", "meddr_ray.demo:run_demo",
                  "the README's main job: the whole recipe, then one served request"),
}  # fmt: skip
"""Every command but ``config``: the stages, then the two that sit above them."""

EXIT_NOT_BUILT = 3


def stage_function(stage: str) -> Callable:
    return COMMANDS[stage].load()


def _add_common(p: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    p.add_argument(
        "--config",
        default=default_preset,
        help=f"preset ({', '.join(available_presets())}) or a YAML file (default: {default_preset})",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.num_workers=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddr-ray",
        description="MedDr on Ray: diagnosis-guided bootstrapping, instruction tuning, retrieval-augmented diagnosis.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines; only the result and errors")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, command in COMMANDS.items():
        p = sub.add_parser(stage, help=command.help, description=command.help)
        _add_common(p, "demo" if stage == "demo" else "tiny")
        if stage == "index":
            p.add_argument(
                "--add", metavar="SOURCE_YAML", help="append the cases of this source (YAML) as a new index version"
            )
        if stage == "serve":
            p.add_argument(
                "--detach", action="store_true", help="deploy and return; the application keeps running (Ray jobs)"
            )
        if stage in ("pipeline", "demo"):
            p.add_argument(
                "--fresh", action="store_true", help="delete the run folder first instead of reusing finished steps"
            )
    cfg = sub.add_parser("config", help="show the resolved config", description="show the resolved config")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    show = cfg_sub.add_parser("show", help="print the resolved config as YAML")
    _add_common(show)
    return parser


def _error_message(exc: BaseException) -> Optional[str]:
    """A clean one-line message for errors users cause (bad config, bad data, missing model), else None."""
    from meddr_ray.model.loading import ModelNotFoundError

    from meddr_ray.retrieval.format import IndexArtifactError
    from meddr_ray.stages.evaluate.stage import EvalArtifactError
    from meddr_ray.storage import RunBusyError

    known: List[type] = [ConfigError, ModelNotFoundError, FileNotFoundError, IndexArtifactError, RunBusyError,
                         EvalArtifactError]  # fmt: skip
    try:
        from meddr_ray.data import errors

        known.append(errors.DataError)
        data_error = errors.unwrap_data_error(exc)
        if data_error is not None:
            return f"data error: {data_error}"
    except ImportError:
        pass
    return _known_error(exc, tuple(known))


def _known_error(exc: BaseException, known: Tuple[type, ...]) -> Optional[str]:
    """The message of a ``known`` error behind ``exc``: itself, or one raised inside a Ray task or actor (a bad
    index found by an actor's constructor reaches the driver as ``ActorDiedError`` with the original only in its
    text, a task's as ``RayTaskError`` with it as ``cause``)."""
    try:
        from ray.exceptions import RayError
    except ImportError:  # pragma: no cover - Ray is a dependency
        RayError = ()  # noqa: N806
    wrapped, seen, stack = [], set(), [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, RayError) or type(err).__module__.startswith("ray."):
            wrapped.append(err)  # its text is the remote traceback; the original may be its cause
        elif isinstance(err, known):
            return str(err)
        stack.extend([getattr(err, "cause", None), err.__cause__, err.__context__])
    names = "|".join(sorted({t.__name__ for t in known}))
    for err in wrapped:
        found = re.findall(rf"^(?:[\w.]+\.)?(?:{names}): (.+)$", str(err), flags=re.MULTILINE)
        if found:
            return re.sub(r"\x1b\[[0-9;]*m", "", found[-1]).strip()
    return None


def _show(stage: str, result: Optional[StageResult]) -> None:
    """What a person sees when a stage returns: its headline, then where it wrote."""
    if result is None:  # serve: it reported where it answers itself
        return
    if result.headline:
        print(result.headline)
    print(f"{stage}: wrote {result.path}")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    progress.configure(quiet=args.quiet)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.stage == "config":
            sys.stdout.write(cfg.to_yaml())
            return 0
        if args.stage == "index" and args.add:
            cfg = with_added_index_source(cfg, args.add)
        func = stage_function(args.stage)
        kwargs = {"detach": True} if args.stage == "serve" and args.detach else {}
        if getattr(args, "fresh", False):
            kwargs["fresh"] = True
        _show(args.stage, func(cfg, **kwargs))
        return 0
    except StageNotBuilt as exc:
        print(f"meddr-ray: {exc}", file=sys.stderr)
        return EXIT_NOT_BUILT
    except KeyboardInterrupt:
        print("meddr-ray: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - turn user errors into one line, keep tracebacks for bugs
        message = _error_message(exc)
        if message is None:
            raise
        print(f"meddr-ray: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
