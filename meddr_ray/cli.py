"""``meddr-ray <stage> --config PRESET_OR_FILE key=value ...``: one entry point over the stage functions.

Each stage is one library function ``run_<stage>(cfg) -> str`` (see ``STAGES``); the job scripts in ``jobs/`` and
the tests call the same functions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from typing import Callable, Dict, List, Optional, Tuple

from meddr_ray.config import ConfigError, available_presets, load_config

# stage -> (module, function, one-line help). A stage whose module is missing is reported as not built yet.
STAGES: Dict[str, Tuple[str, str, str]] = {
    "bootstrap": ("meddr_ray.bootstrap", "run_bootstrap", "teacher writes reports for labelled images (Ray Data)"),
    "instruct": ("meddr_ray.instruct", "run_instruct", "build the instruction-tuning mix (Appendix A templates)"),
    "train": ("meddr_ray.train", "run_train", "LoRA instruction tuning on Ray Train + DeepSpeed ZeRO-3"),
    "index": ("meddr_ray.index", "run_index", "embed training images into a versioned FAISS index"),
    "evaluate": ("meddr_ray.evaluate", "run_evaluate", "no-RAG / RAG / voting metrics on held-out data"),
    "serve": ("serve_apps.launch", "run_serve", "start the Ray Serve application (HTTP API) and serve until Ctrl-C"),
    "pipeline": ("meddr_ray.pipeline", "run_pipeline", "bootstrap -> instruct -> train -> index -> evaluate"),
    "demo": ("meddr_ray.demo", "run_demo", "the README's main job: the whole recipe, then one served request"),
}

EXIT_NOT_BUILT = 3


class StageNotBuilt(RuntimeError):
    pass


def stage_function(stage: str) -> Callable:
    module_name, func_name, _ = STAGES[stage]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise StageNotBuilt(f"stage {stage!r} is not built yet (no module {module_name})") from exc
        raise
    func = getattr(module, func_name, None)
    if func is None:
        raise StageNotBuilt(f"stage {stage!r} is not built yet ({module_name}.{func_name} is missing)")
    return func


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
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, (_, _, help_text) in STAGES.items():
        p = sub.add_parser(stage, help=help_text, description=help_text)
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

    from meddr_ray.faiss_index import IndexArtifactError
    from meddr_ray.evaluate.stage import EvalArtifactError
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        cfg = load_config(args.config, args.overrides)
        if args.stage == "config":
            sys.stdout.write(cfg.to_yaml())
            return 0
        func = stage_function(args.stage)
        kwargs = {"add_source": args.add} if args.stage == "index" and args.add else {}
        if args.stage == "serve" and args.detach:
            kwargs = {"detach": True}
        if getattr(args, "fresh", False):
            kwargs["fresh"] = True
        result = func(cfg, **kwargs)
        if result:
            print(f"{args.stage}: wrote {result}")
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
