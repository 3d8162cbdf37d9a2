"""Every stage as a Ray job on a real local cluster with token authentication, as an operator runs them
(docs/operations.md): ``ray start --head`` with the dashboard in a temporary folder on free ports, then
``ray job submit --working-dir <repo> --runtime-env-json ...`` on the tiny preset, all on one ``file://`` run
directory (a pyarrow-filesystem URI, the way a shared store is named):

1. jobs/pipeline.py: the whole tiny pipeline from nothing (every step runs), then again (every step reused);
2. jobs/bootstrap.py, instruct.py, finetune.py, build_index.py, evaluate.py on that run, each resuming from what is
   there: bootstrap generates nothing twice; finetune extends the run, is stopped midway (``ray job stop``),
   resubmitted, and resumes from its newest checkpoint; index and evaluate redo their work for the new adapter;
3. jobs/serve.py deploys the API, which answers with its bearer token.

Each job's status (REST while waiting, then ``ray job status``), driver log (``ray job logs``) and outputs on disk
are checked. A client without the token, or with a wrong one, is refused. The stages' and Serve's metrics are read
from the node's Prometheus endpoint (``--metrics-export-port``) while the jobs run. (The pipeline runs first: run
after the stage jobs, it would retrain from step 0, because a pipeline restarts training whenever an earlier step
ran again.)

The cluster is this test's own (its own ports, temp folder and token), beside the session's shared one, and is
stopped at the end: ``ray start --block`` runs in its own session and its process group is terminated; any process
still running from its temp folder is killed by pid. Authentication stays on throughout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY_BIN = str(Path(sys.executable).with_name("ray"))
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# What the working-dir upload leaves out (Ray also honours .gitignore): the venv, runs and caches are far above
# the upload limit, and the cluster's nodes have the package installed already.
EXCLUDES = [".venv", ".git", "runs", ".cache", ".pytest_cache", "**/__pycache__", "*.egg-info"]
LABELS = ["malignant", "normal, benign"]

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def _free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:<port>: the job API's address
    metrics_url: str  # the node's Prometheus endpoint
    temp_dir: Path
    token: str
    env: Dict[str, str]  # a client's environment: RAY_AUTH_MODE=token, the token file
    log: Path

    def ray(self, *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """The ``ray`` CLI against this cluster, as an operator types it."""
        return subprocess.run([RAY_BIN, *args], env=env or self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)

    def request(self, path: str, headers: Optional[Dict[str, str]] = None, method: str = "GET"):
        """(status, body) of one call to the dashboard's REST API, with ``headers`` only (no token by default)."""
        req = urllib.request.Request(self.dashboard + path, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, res.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def job_status(self, job_id: str) -> str:
        status, body = self.request(f"/api/jobs/{job_id}", {"Authorization": f"Bearer {self.token}"})
        assert status == 200, f"job {job_id}: HTTP {status}: {body}"
        return json.loads(body)["status"]


def _client_env(token_file: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # not the session cluster's settings
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python` in an entrypoint: this venv
        PYTHONUNBUFFERED="1",
    )
    return env


def _kill_leftovers(temp_dir: Path) -> None:
    """Kill, by pid, any process still running from the cluster's temp folder (its workers, job drivers)."""
    marker = str(temp_dir)
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(pid_dir / "cwd")
        except OSError:
            continue
        if int(pid_dir.name) != os.getpid() and (marker in cmdline or cwd.startswith(marker)):
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("job-submit")
    # The token: `ray get-auth-token --generate` writes ~/.ray/auth_token; here under a scratch HOME, so the
    # user's own token (and the session cluster's) is left alone. Every client below names the file instead.
    home = work / "home"
    gen = subprocess.run([RAY_BIN, "get-auth-token", "--generate"], env={**os.environ, "HOME": str(home)},
                         capture_output=True, text=True, timeout=120)
    token_file = home / ".ray" / "auth_token"
    assert gen.returncode == 0 and token_file.is_file(), gen.stderr
    token = token_file.read_text().strip()
    env = _client_env(token_file)

    temp_dir = Path(tempfile.mkdtemp(prefix="rjs", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, client, metrics, agent, agent_grpc, rt_agent, node_mgr, obj_mgr = _free_ports(9)
    log = work / "ray-start.log"
    start = [
        RAY_BIN, "start", "--head", "--block", "--temp-dir", str(temp_dir), "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash), "--ray-client-server-port", str(client), "--metrics-export-port", str(metrics),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(rt_agent), "--node-manager-port", str(node_mgr),
        "--object-manager-port", str(obj_mgr),
        "--num-cpus", "4",  # logical CPUs, as the tiny preset's local cluster (2 actors or workers + driver tasks)
        "--object-store-memory", str(300 * 1024 ** 2), "--disable-usage-stats",
    ]
    # metrics every 2 s (default 10): a short tiny job's gauges reach the endpoint while its workers still live
    server_env = {**env, "RAY_metrics_report_interval_ms": "2000"}
    with open(log, "w") as out:
        proc = subprocess.Popen(start, env=server_env, stdout=out, stderr=subprocess.STDOUT, cwd=work,
                                start_new_session=True)
    c = Cluster(f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{metrics}/metrics", temp_dir, token, env, log)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if c.request("/api/jobs/", {"Authorization": f"Bearer {token}"})[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, f"the dashboard did not answer in 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield c
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its raylet, GCS and dashboard
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _kill_leftovers(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ metrics


@dataclass
class MetricsSampler:
    """Reads the node's Prometheus endpoint every second in a thread; keeps, per metric family, the largest value
    and the labels seen (gauges vanish ~2 report intervals after their process ends: they are read while the jobs
    run)."""

    url: str
    seen: Dict[str, float] = field(default_factory=dict)
    labels: Dict[str, str] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    LINE = re.compile(r"^(ray_meddr_[a-zA-Z0-9_]+|ray_serve_[a-zA-Z0-9_]+)(\{[^}]*\})?\s+(\S+)")

    def read_once(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=10) as res:
                text = res.read().decode()
        except OSError as exc:
            self.errors.append(str(exc))
            return
        for line in text.splitlines():
            m = self.LINE.match(line)
            if m:
                name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
                self.seen[name] = max(value, self.seen.get(name, float("-inf")))
                self.labels[name] = labels

    def run(self) -> None:
        while not self._stop.wait(1.0):
            self.read_once()

    def stop(self) -> None:
        self._stop.set()
        self.read_once()


# ------------------------------------------------------------------------------------------------ jobs


def _runtime_env(extra_env: Optional[Dict[str, str]] = None) -> str:
    env_vars = {
        "MEDDR_RAY_CACHE": os.environ["MEDDR_RAY_CACHE"],  # the tests' offline-built tiny models (conftest.py)
        "DS_ACCELERATOR": "cpu",  # DeepSpeed's CPU backend: no CUDA probing on this machine
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",  # driver lines reach `ray job logs` as they are printed
        **(extra_env or {}),
    }
    return json.dumps({"excludes": EXCLUDES, "env_vars": env_vars})


def submit(c: Cluster, job_id: str, script: str, args: List[str], extra_env: Optional[Dict[str, str]] = None) -> None:
    res = c.ray("job", "submit", "--address", c.dashboard, "--submission-id", job_id, "--no-wait",
                "--working-dir", str(ROOT), "--runtime-env-json", _runtime_env(extra_env),
                "--", "python", f"jobs/{script}", "--config", "tiny", *args)
    assert res.returncode == 0, f"ray job submit {script}: {res.stdout}\n{res.stderr}"


def wait(c: Cluster, job_id: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while True:
        status = c.job_status(job_id)
        if status in TERMINAL:
            return status
        assert time.time() < deadline, f"job {job_id} still {status} after {timeout} s"
        time.sleep(1)


def logs(c: Cluster, job_id: str) -> str:
    res = c.ray("job", "logs", "--address", c.dashboard, job_id)
    assert res.returncode == 0, res.stderr
    return res.stdout


def run_job(c: Cluster, job_id: str, script: str, args: List[str], extra_env: Optional[Dict[str, str]] = None) -> str:
    """Submit, wait, and check the status the CLI reports; the job's driver log."""
    submit(c, job_id, script, args, extra_env)
    status = wait(c, job_id)
    log = logs(c, job_id)
    assert status == "SUCCEEDED", f"{script} ended {status}:\n{log[-4000:]}"
    res = c.ray("job", "status", "--address", c.dashboard, job_id)
    said = res.stdout + res.stderr
    assert res.returncode == 0 and f"Job '{job_id}' succeeded" in said, said  # the CLI's own words
    return log


# ------------------------------------------------------------------------------------------------ tests


def test_a_client_without_the_token_is_refused(cluster):
    # with the token: the CLI lists the jobs
    ok = cluster.ray("job", "list", "--address", cluster.dashboard)
    assert ok.returncode == 0, ok.stderr
    # the REST API without any token, and with a wrong one
    assert cluster.request("/api/jobs/")[0] == 401
    assert cluster.request("/api/jobs/", {"Authorization": "Bearer not-the-token"})[0] == 403
    # the CLI without the token: token mode on, but no token in the environment, the file or ~/.ray
    empty_home = cluster.temp_dir.parent / f"{cluster.temp_dir.name}-nohome"
    empty_home.mkdir(exist_ok=True)
    no_token = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    no_token["HOME"] = str(empty_home)
    refused = cluster.ray("job", "list", "--address", cluster.dashboard, env=no_token)
    assert refused.returncode != 0
    assert "401" in refused.stderr + refused.stdout or "Authentication" in refused.stderr + refused.stdout
    # the CLI with a wrong token
    wrong = cluster.ray("job", "list", "--address", cluster.dashboard, env={**no_token, "RAY_AUTH_TOKEN": "wrong"})
    assert wrong.returncode != 0


def _read_parquet_rows(folder: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in folder.glob("*.parquet"))


def _checkpoint_steps(run: Path) -> List[int]:
    return sorted(int(p.name.rsplit("step", 1)[1]) for p in (run / "train" / "finetune").glob("checkpoint_step*"))


def test_every_stage_as_a_job_on_a_file_uri_run_resumes_and_reports_metrics(cluster, tmp_path):
    from meddr_ray.stages.instruct import published_mix_files

    run = tmp_path / "run"
    run_uri = f"file://{run}"
    serve_port = _free_ports(1)[0]
    common = [
        f"run_dir={run_uri}",
        "bootstrap.sources.0.limit=16",
        "instruct.sources.0.limit=64",
        "train.global_batch_size=8",  # 2 workers x 4 micro, no accumulation: ~9 steps per epoch of ~72 rows
        "train.epochs=3",
        "train.checkpoint_every=4",
        "train.log_every=4",
        "index.sources.0.limit=96",
        "evaluate.sources.0.limit=16",
        f"serve.port={serve_port}",
    ]
    sampler = MetricsSampler(cluster.metrics_url)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    try:
        # ---- the whole tiny pipeline first, on the file:// run: every stage's output from nothing
        log = run_job(cluster, "meddr-pipeline-1", "pipeline.py", [*common, "train.max_steps=8"])
        summary = json.loads((run / "pipeline.json").read_text())
        assert set(summary["steps"]) == {"bootstrap", "instruct", "train", "index", "evaluate"}, log[-3000:]
        assert not any(r["reused"] for r in summary["steps"].values())
        assert summary["run_dir"] == run_uri
        assert json.loads((run / "adapter" / "meddr.json").read_text())["final_metrics"]["step"] == 8
        first_version = (run / "index" / "CURRENT").read_text().strip()
        reports = [i for f in sorted((run / "bootstrap").glob("*.parquet"))
                   for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]  # fmt: skip
        assert len(reports) == len(set(reports)) == 16
        mix = pq.read_table(published_mix_files(str(run / "instruct")), columns=["task"]).column("task").to_pylist()
        assert {"diagnosis", "guided_report"} <= set(mix)
        assert (run / "adapter" / "adapter_config.json").is_file() and (run / "eval" / "metrics.json").is_file()

        # ---- the same pipeline again: every finished step is reused, nothing is written twice
        run_job(cluster, "meddr-pipeline-2", "pipeline.py", [*common, "train.max_steps=8"])
        again = json.loads((run / "pipeline.json").read_text())
        assert all(r["reused"] for r in again["steps"].values()) and again["outputs"] == summary["outputs"]
        assert (run / "index" / "CURRENT").read_text().strip() == first_version
        assert _read_parquet_rows(run / "bootstrap") == 16

        # ---- then each stage as its own job on that run: each resumes from what is there
        log = run_job(cluster, "meddr-bootstrap-1", "bootstrap.py", common)
        assert "written 0, skipped (already done) 16" in log, log[-2000:]  # nothing generated twice
        assert _read_parquet_rows(run / "bootstrap") == 16

        run_job(cluster, "meddr-instruct-1", "instruct.py", common)
        assert published_mix_files(str(run / "instruct"))

        # finetune: extends the pipeline's 8 steps to 24; stopped midway by `ray job stop`, resubmitted, resumes
        # from its newest checkpoint
        longer = [*common, "train.max_steps=24"]
        submit(cluster, "meddr-finetune-1", "finetune.py", longer)
        deadline = time.time() + 600
        while not [s for s in _checkpoint_steps(run) if s > 8]:
            status = cluster.job_status("meddr-finetune-1")
            assert status not in TERMINAL, f"finetune ended {status} before its next checkpoint:\n" + \
                logs(cluster, "meddr-finetune-1")[-4000:]
            assert time.time() < deadline, "no new checkpoint in 600 s"
            time.sleep(0.5)
        stopped = cluster.ray("job", "stop", "--address", cluster.dashboard, "meddr-finetune-1")
        assert stopped.returncode == 0, stopped.stderr
        assert wait(cluster, "meddr-finetune-1") == "STOPPED", "finetune finished before the stop reached it"
        first = logs(cluster, "meddr-finetune-1")
        assert "[train] resuming at step 8" in first, first[-3000:]
        assert json.loads((run / "adapter" / "meddr.json").read_text())["final_metrics"]["step"] == 8  # not done

        log = run_job(cluster, "meddr-finetune-2", "finetune.py", longer)
        resumed = re.search(r"\[train\] resuming at step (\d+)", log)
        assert resumed and int(resumed.group(1)) >= 12, log[-4000:]
        meta = json.loads((run / "adapter" / "meddr.json").read_text())
        assert meta["final_metrics"]["step"] == 24 and meta["events"][-1]["resumed"] is True

        # build_index: a new version with the new adapter
        run_job(cluster, "meddr-index-1", "build_index.py", longer)
        version = (run / "index" / "CURRENT").read_text().strip()
        assert version != first_version
        assert json.loads((run / "index" / version / "manifest.json").read_text())["count"] == 96

        # evaluate: the student and index changed, so its answers are made again
        run_job(cluster, "meddr-evaluate-1", "evaluate.py", longer)
        assert json.loads((run / "eval" / "metrics.json").read_text())["datasets"]["breastmnist"]["modes"]

        # serve: deployed by a job, answers with its bearer token (Serve's metrics come from this)
        serve_token = "job-submit-test-token"
        log = run_job(cluster, "meddr-serve-1", "serve.py", longer, {"MEDDR_SERVE_TOKEN": serve_token})
        assert f"127.0.0.1:{serve_port}" in log, log[-2000:]
        _diagnose(serve_port, serve_token)
        time.sleep(5)  # two metric report intervals
    finally:
        sampler.stop()
        thread.join(timeout=15)
    expected = [
        "ray_meddr_bootstrap_reports_written_total", "ray_meddr_bootstrap_tokens_generated_total",
        "ray_meddr_train_loss", "ray_meddr_train_samples_per_s", "ray_meddr_train_tokens_per_s",
        "ray_meddr_train_step", "ray_meddr_train_last_checkpoint_step", "ray_meddr_train_last_checkpoint_timestamp_s",
        "ray_meddr_index_images_embedded_total", "ray_meddr_evaluate_rows_answered_total",
        "ray_meddr_serve_requests_total", "ray_meddr_serve_request_latency_s_bucket",
        "ray_meddr_serve_batch_size_bucket", "ray_meddr_serve_index_version",
        "ray_serve_deployment_request_counter_total",
    ]
    missing = [m for m in expected if m not in sampler.seen]
    assert not missing, (f"not on {cluster.metrics_url}: {missing}; seen: {sorted(sampler.seen)}; "
                         f"errors: {sampler.errors[-3:]}")
    assert sampler.seen["ray_meddr_bootstrap_reports_written_total"] >= 16
    assert sampler.seen["ray_meddr_index_images_embedded_total"] >= 96
    assert sampler.seen["ray_meddr_train_step"] >= 4 and sampler.seen["ray_meddr_train_last_checkpoint_step"] >= 4
    assert 'run="finetune"' in sampler.labels["ray_meddr_train_loss"]
    assert sampler.seen["ray_meddr_train_last_checkpoint_timestamp_s"] > time.time() - 3600
    assert sampler.seen["ray_meddr_serve_requests_total"] >= 1


def _diagnose(port: int, token: str) -> None:
    import base64
    import io

    import numpy as np
    from PIL import Image

    from meddr_ray.config import load_config

    arrays = np.load(load_config("tiny").index.sources[0].path)
    buf = io.BytesIO()
    Image.fromarray(arrays["test_images"][0]).save(buf, format="PNG")
    body = json.dumps({"image": base64.b64encode(buf.getvalue()).decode(), "labels": LABELS}).encode()
    url = f"http://127.0.0.1:{port}/v1/diagnose"
    deadline = time.time() + 180
    while True:
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as res:
                answer = json.loads(res.read())
                assert answer["diagnosis"] in LABELS and answer["evidence"], answer
                return
        except (urllib.error.URLError, ConnectionError) as exc:  # the proxy or replicas still starting
            assert time.time() < deadline, f"Serve did not answer on port {port}: {exc}"
            time.sleep(2)
