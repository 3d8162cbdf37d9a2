"""The README's main job (``make demo`` = ``meddr-ray demo --config demo``): the whole MedDr recipe on a local Ray
cluster, then one real request to the served model, then a summary a person can read.

bootstrap (SmolLM2 teacher) -> instruct -> train (ZeRO-3 + LoRA, 2 workers) -> index -> evaluate (Table 4 on the
BreastMNIST test split) -> Serve: one ``POST /v1/diagnose`` over HTTP -> the table, a bootstrapped report, the
served answer with its evidence and where every artifact is. Finished steps are reused on a re-run
(``--fresh`` starts over). One demo or pipeline at a time per run folder (:func:`meddr_ray.storage.run_lock`,
held from the first step to the served request); a taken ``serve.port`` stops it before any step runs. This module
is an entry point: it sits beside ``cli.py`` and may use ``serve_apps``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import textwrap
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

import pyarrow.parquet as pq

from meddr_ray import storage
from meddr_ray.config import Config, ConfigError
from meddr_ray.progress import report
from meddr_ray.stages.pipeline import load_summary, run_pipeline
from meddr_ray.storage import join_path, run_lock
from meddr_ray.stages.registry import StageResult

RULE = "=" * 100


def run_demo(cfg: Config, fresh: bool = False) -> StageResult:
    """Run the recipe, serve it, send one request, print the summary; stops the Serve app and the local Ray
    cluster it started. Returns the run folder."""
    import ray

    started = time.time()
    owns_ray = not ray.is_initialized()
    _check_request_source(cfg)  # a missing evaluate source stops the demo now, not after minutes of training
    with run_lock(cfg.run_dir):
        try:
            check_port_free(cfg)  # before the pipeline's minutes, not after them
            run_pipeline(cfg, fresh=fresh)
            served = serve_one_request(cfg)
            print(summary_text(cfg, served, time.time() - started), flush=True)
        finally:
            if owns_ray and ray.is_initialized():
                ray.shutdown()
    return StageResult(cfg.run_dir)


def check_port_free(cfg: Config) -> None:
    """A clear error when ``serve.port`` is taken. The demo starts its own cluster, and Serve's proxy could not
    listen there: the request would go to whatever holds the port (another ``meddr-ray serve``) or nowhere.
    Joining a cluster (``ray.address`` / ``RAY_ADDRESS``) may find Serve itself on the port: not checked then."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    host = cfg.serve.host if cfg.serve.host not in ("", "0.0.0.0", "::") else "0.0.0.0"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a socket in TIME_WAIT is no obstacle
        try:
            sock.bind((host, cfg.serve.port))
        except OSError as exc:
            raise ConfigError(
                f"key 'serve.port': {host}:{cfg.serve.port} is taken ({exc.strerror}; another `meddr-ray serve`?): "
                f"stop what listens there or pass serve.port=<free port>"
            ) from None


# ------------------------------------------------------------------------------------------------ serving


def _check_request_source(cfg: Config) -> None:
    """The first evaluation source is where the request's image comes from: it must be named and (when local)
    exist. Checked without reading it (reading would start Ray before the pipeline sets it up)."""
    if not cfg.evaluate.sources:
        raise ConfigError("key 'evaluate.sources': the demo evaluates and serves a test image from it; list one")
    src = cfg.evaluate.sources[0]
    if src.path and not storage.exists(src.path):
        raise FileNotFoundError(f"evaluate.sources[0] ({src.name}): no file or folder at {src.path}")


def _first_test_sample(cfg: Config) -> Dict[str, Any]:
    """The first row of the first evaluation source (a test image the student has not seen), as the client
    would send it; read through the same reader as every stage."""
    from meddr_ray.data import read_source

    _check_request_source(cfg)
    rows = read_source(cfg.evaluate.sources[0], cfg.data).take(1)
    if not rows:
        raise ConfigError(f"key 'evaluate.sources[0]': source {cfg.evaluate.sources[0].name!r} has no rows to "
                          f"send to the served model (limit 0, or an empty split?)")  # fmt: skip
    return rows[0]


def _post(url: str, body: Dict[str, Any], token: str, timeout: float = 120.0) -> Dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url} answered {exc.code}: {exc.read().decode(errors='replace')[:500]}") from exc


def serve_one_request(cfg: Config) -> Dict[str, Any]:
    """Start the Serve application on the run, send one ``/v1/diagnose`` request for a test image over HTTP,
    shut the application down; returns the request and the answer."""
    from serve_apps.launch import start_app, stop_app

    sample = _first_test_sample(cfg)
    check_port_free(cfg)  # taken while the pipeline ran?
    # the token of $serve.auth_token_env if set, else one made for this demo (the app never runs without one)
    token = os.environ.get(cfg.serve.auth_token_env, "").strip() or secrets.token_urlsafe(24)
    report("demo", "serve: starting the application (retriever, generator, ingress)")
    t0 = time.time()
    url = start_app(cfg, token=token)
    report("demo", f"serve: up at {url} in {time.time() - t0:.0f} s; POST /v1/diagnose")
    try:
        body = {
            "image": base64.b64encode(sample["image"]).decode(),
            "modality": sample.get("modality"),
            "labels": list(sample.get("label_set") or []),
            "rag": True,
        }
        t1 = time.time()
        answer = _post(f"{url.rstrip('/')}/v1/diagnose", body, token)
        latency = time.time() - t1
    finally:
        stop_app()
    return {"url": url, "sample": sample, "answer": answer, "latency_s": latency}


# ------------------------------------------------------------------------------------------------ summary


def table4_lines(metrics: Dict[str, Any]) -> List[str]:
    """This run's Table 4 (the rows of ``eval/report.md``) as an aligned text table."""
    from meddr_ray.stages.evaluate.report import table4_rows

    if not metrics.get("datasets"):
        return []
    header = ["dataset", "metric", "voting", "w/o RAG", "w/ RAG", "paper: voting", "w/o RAG", "w/ RAG"]
    rows = [header] + table4_rows(metrics)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    return ["  " + "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def _sample_report(cfg: Config) -> Optional[Dict[str, Any]]:
    """One bootstrapped report with both sections (else the first), read from one Parquet part."""
    folder = cfg.bootstrap.output_dir or cfg.layout.bootstrap_dir
    parts = [f for f in storage.list_files(folder, ".parquet")]
    for path in parts[:4]:
        fs, p = storage.resolve(path)
        with fs.open_input_file(p) as f:
            rows = pq.read_table(f, columns=["id", "label", "report", "quality"]).to_pylist()
        good = [r for r in rows if r["quality"] == "ok"]
        if good or rows:
            return (good or rows)[0]
    return None


def _show(path: str) -> str:
    """A path as the person who ran the demo would type it: relative to the working directory when inside it."""
    if "://" in path or not path.startswith(os.getcwd() + os.sep):
        return path
    return os.path.relpath(path)


def summary_text(cfg: Config, served: Dict[str, Any], seconds: float) -> str:
    run = load_summary(cfg.run_dir)
    outputs = run.get("outputs", {})
    metrics_path = join_path(outputs.get("evaluate", cfg.layout.evaluate_dir), "metrics.json")
    metrics = json.loads(storage.read_text(metrics_path)) if storage.exists(metrics_path) else {}
    out = [RULE, "MedDr on Ray: the demo run", RULE,
           "The paper's Table 4 on this run: the student (a tiny LM trained for minutes on 2 CPU cores, on a frozen",
           "pretrained image encoder) against the paper's 40B MedDr; voting and both student columns answer the same",
           "test images from the same neighbours. Accuracy is MultiMedEval's (mean per-class recall); details in",
           "eval/report.md.", ""]  # fmt: skip
    out += table4_lines(metrics) or ["  (no classification results in metrics.json)"]

    report = _sample_report(cfg)
    if report:
        out += ["", f"A bootstrapped report (teacher {cfg.teacher.name}, id {report['id']}, diagnosis given: "
                f"{report['label']}):"]  # fmt: skip
        out += textwrap.wrap(report["report"] or "", width=96, initial_indent="  ", subsequent_indent="  ")

    answer, sample = served["answer"], served["sample"]
    out += ["", f"Served answer: POST {served['url'].rstrip('/')}/v1/diagnose, one test image (true label: "
            f"{sample.get('label')}), {served['latency_s'] * 1000:.0f} ms:"]  # fmt: skip
    out.append(f"  diagnosis: {answer.get('diagnosis')}    vote of the retrieved cases: {answer.get('vote')}")
    out.append(f"  model text: {answer.get('text')!r}")
    out.append("  evidence (the retrieved cases a clinician can check):")
    for ev in answer.get("evidence", []):
        out.append(f"    {ev.get('score', 0):.3f}  {str(ev.get('label')):12} {ev.get('dataset')}  id {ev.get('id')}")

    out += ["", "Artifacts:"]
    for step, path in outputs.items():
        record = run.get("steps", {}).get(step, {})
        how = "reused" if record.get("reused") else f"{record.get('seconds', '?')} s"
        out.append(f"  {step:10} {_show(path)}  ({how})")
    if "evaluate" in outputs:
        for name in ("report.md", "metrics.json", "predictions/"):
            out.append(f"  {'':10} {_show(join_path(outputs['evaluate'], name))}")
    out += [f"  {'':10} {_show(cfg.layout.pipeline_summary)}", "",
            f"Demo finished in {seconds / 60:.1f} min. Serve it again: export {cfg.serve.auth_token_env}=<token>; "
            f"meddr-ray serve --config {cfg.preset}", RULE]  # fmt: skip
    return "\n".join(out)
