"""The Serve application under operations, over real HTTP: load, a killed replica, autoscaling, and hot swaps of
the index version and of the adapter while clients keep sending requests.

One application for the module, on the session's Ray cluster, serving a *copy* of the session's tiny run (the
index gets a second version here). The generator autoscales between 1 and 2 replicas with a low target and short
delays, so scaling shows within a minute. Every load is bounded in requests and seconds and stays on loopback.

The client is what a careful user writes: a 503 with ``Retry-After`` (a replica went away mid-request) is retried
once, after the time it names; any other failure, or a second 503, is a lost request.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import shutil
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from meddr_ray.config import with_added_index_source, PACKAGE_DIR, load_config
from meddr_ray.retrieval.store import current_version
from serve_apps import launch

pytestmark = pytest.mark.integration

TOKEN = secrets.token_urlsafe(24)
APP = "meddr-ops-test"
LABELS = ["malignant", "normal, benign"]
NPZ = PACKAGE_DIR / "assets" / "breastmnist.npz"
MIN_REPLICAS, MAX_REPLICAS = 1, 2
ADDED = 30  # test images 0..29 go into the index's second version
ADAPTER = "adapter-v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_b64(split: str, i: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.load(NPZ)[f"{split}_images"][i]).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


TEST_IMAGES = [png_b64("test", i) for i in range(ADDED)]  # in v0002 (after the add), not in v0001
PROBES = [png_b64("test", i) for i in range(40, 44)]  # in no version


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def run_copy(tiny_index_run, tmp_path_factory) -> str:
    """The session's run, copied: this module publishes a second index version into it."""
    run_dir = tmp_path_factory.mktemp("serve-ops") / "run"
    shutil.copytree(tiny_index_run.run_dir, run_dir)
    assert not (run_dir / "adapter").exists()  # the base student answers until the adapter test rolls one out
    return str(run_dir)


@pytest.fixture(scope="module")
def served(run_copy):
    cfg = load_config(
        "tiny",
        [
            f"run_dir={run_copy}",
            f"serve.app_name={APP}",
            f"serve.port={free_port()}",
            "serve.index_poll_s=1",  # the retriever looks at CURRENT every second
            f"serve.generator.min_replicas={MIN_REPLICAS}",
            f"serve.generator.max_replicas={MAX_REPLICAS}",
            "serve.generator.target_ongoing_requests=2",  # 16 clients want 8 replicas: it goes to the ceiling
            "serve.generator.upscale_delay_s=1",
            "serve.generator.downscale_delay_s=3",
            "serve.generator.health_check_period_s=2",  # a killed replica is noticed within seconds
            "serve.ingress.max_replicas=1",  # one ingress: the generator is what these tests move
        ],
    )
    app = launch.start(cfg, token=TOKEN)
    yield cfg, app.url
    launch.stop(app)


def redeploy(cfg, user_configs: Optional[Dict[str, dict]] = None) -> float:
    """``serve.run`` of the application again (every replica is replaced, new ones first); returns when it is
    RUNNING, as ``time.time()``."""
    launch.start(cfg, token=TOKEN, user_configs=user_configs)
    return time.time()


def publish_v0002(run_copy: str) -> str:
    """``meddr-ray index --add``: test images 0..29 into a new version of the copied run's index."""
    from meddr_ray.stages.index import run_index

    source = Path(run_copy) / "new_cases.yaml"
    source.write_text(f"name: breastmnist\nformat: medmnist\npath: {NPZ}\nsplits: [test]\nlimit: {ADDED}\n")
    return run_index(with_added_index_source(load_config("tiny", [f"run_dir={run_copy}"]), str(source))).path


def index_ids(cfg, version: str) -> set:
    path = Path(cfg.layout.index_dir) / version / "values.parquet"
    return set(pq.read_table(path, columns=["id"]).column("id").to_pylist())


def case_ids(cfg, version: str, split: str) -> dict:
    """Row of the ``split`` -> the id of its image's case in ``version`` (a case is named by its image)."""
    path = Path(cfg.layout.index_dir) / version / "values.parquet"
    rows = pq.read_table(path, columns=["id", "split", "source_index"]).to_pylist()
    return {r["source_index"]: r["id"] for r in rows if r["split"] == split}


def describe(deployment: str, until: Callable[[Dict[str, dict]], bool] = bool, max_calls: int = 100) -> Dict[str, dict]:
    """``describe()`` of the replicas of ``deployment`` by Serve replica id: called (Serve routes each call to one
    replica) until ``until(answers so far)`` holds, at most ``max_calls`` times."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, APP)
    answers: Dict[str, dict] = {}
    try:
        for _ in range(max_calls):
            answer = handle.describe.remote().result(timeout_s=60)
            answers[answer["replica"]] = answer
            if until(answers):
                break
    finally:
        handle.shutdown()
    return answers


def describe_one(deployment: str) -> dict:
    return next(iter(describe(deployment).values()))


# ------------------------------------------------------------------------------------------------- clients


@dataclass
class Result:
    image: int
    """Index into the load's image list."""
    started: float
    status: int
    """The final status (after the one retry); 0: no HTTP answer (connection error, timeout)."""
    first_status: int
    latency: float
    """Seconds of the whole call, the retry and its wait included."""
    attempts: int
    headers: Dict[str, str] = field(default_factory=dict)
    body: Optional[dict] = None
    error: Optional[str] = None


class Load:
    """``clients`` threads posting ``/v1/diagnose`` over ``images`` (round robin) until ``max_requests`` are sent,
    ``max_seconds`` have passed, or :meth:`stop`. A 503 with ``Retry-After`` is retried once."""

    def __init__(self, url: str, *, clients: int, max_requests: int, max_seconds: float, images=TEST_IMAGES):
        self.url, self.clients, self.images = url, clients, images
        self.max_requests, self.deadline = max_requests, time.time() + max_seconds
        self.results: List[Result] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def start(self) -> "Load":
        self.started = time.time()
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> "Load":
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)
        self.elapsed = time.time() - self.started
        return self

    def run(self) -> "Load":
        self.start()
        for t in self._threads:
            t.join(timeout=max(0.0, self.deadline - time.time()) + 180)
        return self.stop()

    def _take(self) -> Optional[int]:
        with self._lock:
            if self._stop.is_set() or self._next >= self.max_requests or time.time() > self.deadline:
                return None
            self._next += 1
            return self._next - 1

    def _client(self) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=120) as client:
            while (n := self._take()) is not None:
                self.results.append(self._call(client, n % len(self.images)))

    def _call(self, client: httpx.Client, image: int) -> Result:
        body = {"image": self.images[image], "labels": LABELS, "modality": "breast ultrasound"}
        started = time.time()
        statuses, res, error = [], None, None
        while len(statuses) < 2:
            try:
                res = client.post("/v1/diagnose", json=body)
            except httpx.HTTPError as exc:
                statuses.append(0)
                error, res = type(exc).__name__, None
                break
            statuses.append(res.status_code)
            if res.status_code == 503 and "retry-after" in res.headers and len(statuses) == 1:
                time.sleep(min(float(res.headers["retry-after"]), 5.0))
                continue
            break
        payload = res.json() if res is not None and res.headers.get("content-type") == "application/json" else None
        headers = dict(res.headers) if res is not None else {}
        return Result(image, started, statuses[-1], statuses[0], time.time() - started, len(statuses), headers,
                      payload, error)  # fmt: skip

    # ---------------------------------------------------------------------------------------------- figures

    def lost(self) -> List[Result]:
        return [r for r in self.results if r.status != 200]

    def summary(self, name: str) -> str:
        ok = sorted(r.latency for r in self.results if r.status == 200)
        p = (lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] * 1000) if ok else (lambda q: float("nan"))
        firsts = Counter(r.first_status for r in self.results)
        line = (
            f"[{name}] {len(self.results)} requests from {self.clients} clients in {self.elapsed:.1f} s "
            f"({len(self.results) / max(self.elapsed, 1e-9):.1f}/s): p50 {p(0.5):.0f} ms, p99 {p(0.99):.0f} ms; "
            f"first answers {dict(sorted(firsts.items()))}, retried {sum(r.attempts > 1 for r in self.results)}, "
            f"lost {len(self.lost())}"
        )
        print(line, flush=True)
        return line


def check_answer(r: Result, ids_by_version: Dict[str, set]) -> None:
    """A 200 whose diagnosis is one of the labels and whose evidence is in the version that answered it."""
    assert r.status == 200, (r.status, r.error, r.body)
    version = r.headers.get("x-meddr-index-version")
    assert version in ids_by_version, f"answered from index version {version!r}"
    assert r.body["diagnosis"] in LABELS and r.body["vote"] in LABELS
    evidence = [e["id"] for e in r.body["evidence"]]
    assert len(evidence) == 5 and set(evidence) <= ids_by_version[version], (version, evidence)


# ------------------------------------------------------------------------------------------------ replicas


def replica_states(deployment: str = "Generator") -> Dict[str, int]:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return {str(getattr(k, "value", k)): n for k, n in status.replica_states.items() if n}


def replica_ids(deployment: str = "Generator") -> set:
    """Serve ids of the live replica actors of ``deployment`` (named ``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}  # fmt: skip


class Watch:
    """The generator's replica states over time, as ``serve.status()`` reports them (each change once)."""

    def __init__(self):
        self.t0 = time.time()
        self.seen: List[tuple] = []

    def states(self) -> Dict[str, int]:
        states = replica_states()
        if not self.seen or self.seen[-1][1] != states:
            self.seen.append((round(time.time() - self.t0, 1), states))
        return states

    def running(self, n: int) -> bool:
        return self.states() == {"RUNNING": n}

    def until(self, what: str, condition: Callable[[], object], timeout_s: float) -> float:
        """Poll ``condition`` every half second for at most ``timeout_s``; the failure names what was seen.
        Returns when it held (``time.time()``)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if condition():
                return time.time()
            time.sleep(0.5)
        pytest.fail(f"the generator did not {what} within {timeout_s:.0f} s; replica states seen (s, states): "
                    f"{self.seen}")  # fmt: skip


# ----------------------------------------------------------------------------------------------- the tests


@pytest.mark.slow
def test_generator_scales_up_under_load_and_back_down_when_idle(served):
    cfg, url = served
    watch = Watch()
    watch.until(f"settle at its minimum of {MIN_REPLICAS}", lambda: watch.running(MIN_REPLICAS), 150)
    load = Load(url, clients=16, max_requests=20_000, max_seconds=150).start()
    try:
        up = watch.until(f"scale up to {MAX_REPLICAS} under 16 clients", lambda: watch.running(MAX_REPLICAS), 120)
    finally:
        load.stop()
    idle = time.time()
    load.summary("autoscaling load")
    down = watch.until(f"scale back down to {MIN_REPLICAS} when idle", lambda: watch.running(MIN_REPLICAS), 150)
    print(f"[autoscaling] up {up - load.started:.1f} s after the load started, down {down - idle:.1f} s after it "
          f"stopped; replica states seen (s, states): {watch.seen}", flush=True)  # fmt: skip
    assert not load.lost(), [(r.status, r.error) for r in load.lost()[:5]]


def test_16_clients_get_no_5xx(served):
    cfg, url = served
    ids = {"v0001": index_ids(cfg, "v0001")}
    load = Load(url, clients=16, max_requests=320, max_seconds=240).run()
    load.summary("load")
    assert len(load.results) >= 160, f"only {len(load.results)} requests went out"
    assert Counter(r.first_status for r in load.results) == {200: len(load.results)}  # no 5xx, not even retried
    for r in load.results:
        check_answer(r, ids)


@pytest.mark.slow
def test_a_killed_generator_replica_is_replaced_and_no_request_is_lost(served):
    import ray

    cfg, url = served
    watch = Watch()
    load = Load(url, clients=16, max_requests=20_000, max_seconds=240).start()
    try:
        # at the ceiling the autoscaler cannot add one: a new replica can only be the replacement
        watch.until(f"reach {MAX_REPLICAS} replicas under load", lambda: watch.running(MAX_REPLICAS), 120)
        before = replica_ids()
        assert len(before) == MAX_REPLICAS, before
        victim, answer = next(iter(describe("Generator").items()))  # the replica the first call reached
        assert victim in before, (victim, before)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Generator#{victim}", namespace="serve"), no_restart=True)
        killed = time.time()

        def replaced() -> bool:
            ids = replica_ids()  # before the status: a new actor exists only once the controller saw the death
            return victim not in ids and bool(ids - before) and watch.running(MAX_REPLICAS)

        replaced_at = watch.until("replace the killed replica", replaced, 120)
        time.sleep(3)  # the new replica serves under the same load
    finally:
        load.stop()
    load.summary("replica kill")
    (new,) = replica_ids() - before
    now = describe("Generator", until=lambda seen: new in seen)
    print(f"[replica kill] killed replica {victim} (actor {answer['actor_id']}); replaced by {new} (actor "
          f"{now.get(new, {}).get('actor_id')}) {replaced_at - killed:.1f} s later; states seen (s, states): "
          f"{watch.seen}", flush=True)  # fmt: skip
    assert replica_ids() == (before - {victim}) | {new}
    assert new in now and now[new]["actor_id"] != answer["actor_id"]  # the new replica answers; a new actor
    assert victim not in now
    lost = load.lost()
    assert not lost, f"{len(lost)} requests lost after one retry: {[(r.status, r.error) for r in lost[:5]]}"
    assert all(r.first_status in (200, 503) for r in load.results), Counter(r.first_status for r in load.results)
    served_after = [r for r in load.results if r.started > replaced_at]
    assert served_after and all(r.status == 200 for r in served_after)


@pytest.mark.slow
def test_a_new_index_version_is_taken_up_under_load_and_a_pin_takes_it_back(served, run_copy):
    """`meddr-ray index --add` while searches run: answers move from v0001 to v0002 with no failed request and
    none answered from a mix; then a user_config pins v0001 again."""
    cfg, url = served
    index_dir = cfg.layout.index_dir
    assert current_version(index_dir) == "v0001"
    load = Load(url, clients=4, max_requests=20_000, max_seconds=300).start()
    try:
        added = publish_v0002(run_copy)
        assert Path(added).name == "v0002" and current_version(index_dir) == "v0002"
        published = time.time()
        deadline = published + 60
        while time.time() < deadline and not any(
            r.headers.get("x-meddr-index-version") == "v0002" and r.started > published + 1 for r in list(load.results)
        ):
            time.sleep(0.5)
        time.sleep(2)
    finally:
        load.stop()
    load.summary("index hot swap")
    ids = {v: index_ids(cfg, v) for v in ("v0001", "v0002")}
    added_cases = case_ids(cfg, "v0002", "test")
    versions = Counter(r.headers.get("x-meddr-index-version") for r in load.results)
    print(f"[index hot swap] answers by version: {dict(versions)}", flush=True)
    assert versions["v0001"] and versions["v0002"], versions
    for r in load.results:
        check_answer(r, ids)
        top = r.body["evidence"][0]
        if r.headers["x-meddr-index-version"] == "v0002":  # the query image itself is now in the index
            assert top["id"] == added_cases[r.image] and top["score"] == pytest.approx(1, abs=1e-4)
    assert describe_one("Retriever")["version"] == "v0002"

    # pin v0001 with the Retriever's user_config (a redeploy: new replicas apply it in reconfigure) under load
    load = Load(url, clients=4, max_requests=20_000, max_seconds=300).start()
    try:
        pinned_at = redeploy(cfg, {"Retriever": {"index_version": "v0001"}})
        time.sleep(3)  # longer than serve.index_poll_s: the pin holds while CURRENT names v0002
    finally:
        load.stop()
    load.summary("index pin")
    for r in load.results:
        check_answer(r, ids)
    after = [r for r in load.results if r.started > pinned_at]
    assert after and {r.headers["x-meddr-index-version"] for r in after} == {"v0001"}
    assert {k: describe_one("Retriever")[k] for k in ("version", "pinned")} == {"version": "v0001", "pinned": "v0001"}


def test_a_pin_is_not_undone_by_the_follower_loading_current_meanwhile(served, run_copy, monkeypatch):
    """The Retriever's follower wakes while a pinned version is loading (slow storage): the pin must win, not the
    CURRENT version the follower was about to load (it used to switch back right after the pin)."""
    import meddr_ray.retrieval.rag as rag
    from serve_apps.retriever import Retriever

    cfg, _ = served
    if current_version(cfg.layout.index_dir) == "v0001":  # run on its own: the hot-swap test publishes it
        publish_v0002(run_copy)
    slow = rag.load_index

    def slow_load(*args, **kwargs):
        time.sleep(0.5)
        return slow(*args, **kwargs)

    monkeypatch.setattr(rag, "load_index", slow_load)
    fast = load_config("tiny", [f"run_dir={run_copy}", "serve.index_poll_s=0.02"])
    retriever = Retriever.func_or_class(fast)  # the deployment's class, in this process
    try:
        assert retriever.describe()["version"] == "v0002"
        retriever.reconfigure({"index_version": "v0001"})  # 0.5 s of loading: the follower wakes many times
        time.sleep(1.5)
        assert (retriever.describe()["version"], retriever.describe()["pinned"]) == ("v0001", "v0001")
        retriever.reconfigure({"index_version": None})  # follow CURRENT again
        assert (retriever.describe()["version"], retriever.describe()["pinned"]) == ("v0002", None)
    finally:
        retriever._stop.set()


@pytest.fixture(scope="module")
def adapter_v2(served, tmp_path_factory) -> str:
    """A real PEFT adapter for the tiny student whose LoRA B weights are random (not zero), so it answers
    differently from the base model; its vision tower is untouched, so the index still fits it."""
    import torch

    from meddr_ray.model import apply_lora, load_model

    cfg, _ = served
    model = load_model(cfg.student)
    torch.manual_seed(0)  # LoRA A is drawn in apply_lora, B here: the same adapter every run
    peft_model = apply_lora(model.model, cfg.train.lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("adapters") / ADAPTER
    peft_model.save_pretrained(out)
    meta = {
        "base_model": {"name": cfg.student.name, "path": cfg.student.path},
        "preset": cfg.preset,
        "note": "test adapter: LoRA B drawn at random, not trained",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "meddr.json").write_text(json.dumps(meta, indent=2))
    return str(out)


def ask_alone(url: str, images) -> List[httpx.Response]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        return [c.post("/v1/diagnose", json={"image": i, "labels": LABELS, "rag": False}) for i in images]


@pytest.mark.slow
def test_an_adapter_rolls_out_under_load_and_answers_change(served, adapter_v2):
    cfg, url = served
    before = ask_alone(url, PROBES)
    assert [r.headers["x-meddr-model-revision"] for r in before] == ["base"] * len(PROBES)
    load = Load(url, clients=8, max_requests=20_000, max_seconds=300).start()
    try:
        rolled_out = redeploy(cfg, {"Generator": {"adapter_dir": adapter_v2}})
        time.sleep(3)
    finally:
        load.stop()
    load.summary("adapter rollout")
    lost = load.lost()
    assert not lost, f"{len(lost)} requests lost after one retry: {[(r.status, r.error) for r in lost[:5]]}"
    ids = {v: index_ids(cfg, v) for v in ("v0001", "v0002")}
    for r in load.results:
        check_answer(r, ids)
    revisions = Counter(r.headers["x-meddr-model-revision"] for r in load.results)
    print(f"[adapter rollout] answers by model revision: {dict(revisions)}", flush=True)
    after_rollout = [r for r in load.results if r.started > rolled_out]
    assert after_rollout and {r.headers["x-meddr-model-revision"] for r in after_rollout} == {ADAPTER}
    generators = describe("Generator", until=lambda seen: False, max_calls=20)  # every replica a call reaches
    assert {r["adapter_dir"] for r in generators.values()} == {adapter_v2}, generators

    after = ask_alone(url, PROBES)
    assert [r.headers["x-meddr-model-revision"] for r in after] == [ADAPTER] * len(PROBES)
    changed = [a.json()["text"] != b.json()["text"] for a, b in zip(after, before)]
    print(f"[adapter rollout] base: {[r.json()['text'] for r in before]}", flush=True)
    print(f"[adapter rollout] {ADAPTER}: {[r.json()['text'] for r in after]}", flush=True)
    assert all(changed), changed
