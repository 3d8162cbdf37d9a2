"""The Serve application over real HTTP: every endpoint, the OpenAI client, auth, bad input and unusual images.

One application for the module, on the session's Ray cluster, serving the session's tiny run (BreastMNIST train +
val in the index, the base tiny student). The limits are lowered so the over-limit cases stay small.
"""

from __future__ import annotations

import base64
import io
import re
import secrets
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from meddr_ray.config import PACKAGE_DIR, load_config
from serve_apps import launch

pytestmark = pytest.mark.integration

TOKEN = secrets.token_urlsafe(24)
LABELS = ["malignant", "normal, benign"]
MAX_IMAGE_BYTES = 200_000
MAX_BODY_BYTES = 1_000_000
MAX_PIXELS = 1_000_000
APP = "meddr-api-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_index_run):
    cfg = load_config(
        "tiny",
        [
            f"run_dir={tiny_index_run.run_dir}",
            f"serve.app_name={APP}",
            f"serve.port={free_port()}",
            f"serve.max_image_bytes={MAX_IMAGE_BYTES}",
            f"serve.max_body_bytes={MAX_BODY_BYTES}",
            f"serve.max_image_pixels={MAX_PIXELS}",
            "serve.generator.max_replicas=1",  # one replica: the module checks it survives every bad request
            "serve.ingress.max_replicas=1",
        ],
    )
    app = launch.start(cfg, token=TOKEN)
    yield cfg, app.url
    launch.stop(app)


def replica_actors() -> dict:
    """The actor of each deployment's (one) replica, as the replicas report it."""
    from ray import serve

    handles = {
        "Ingress": serve.get_app_handle(APP),
        "Generator": serve.get_deployment_handle("Generator", APP),
        "Retriever": serve.get_deployment_handle("Retriever", APP),
    }
    try:
        return {name: h.describe.remote().result(timeout_s=60)["actor_id"] for name, h in handles.items()}
    finally:
        for h in handles.values():  # a driver-side router outliving the test would poll a cluster that is gone
            h.shutdown()


@pytest.fixture(scope="module")
def replicas_at_start(served):
    return replica_actors()


@pytest.fixture(scope="module")
def client(served):
    _, url = served
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def index_ids(served):
    cfg, _ = served
    index_dir = Path(cfg.layout.index_dir)
    version = (index_dir / "CURRENT").read_text().strip()
    return version, set(pq.read_table(index_dir / version / "values.parquet", columns=["id"]).column("id").to_pylist())


def breast(split: str, i: int) -> np.ndarray:
    return np.load(PACKAGE_DIR / "assets" / "breastmnist.npz")[f"{split}_images"][i]


def encode(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


TRAIN_PNG = encode(Image.fromarray(breast("train", 0)))
TEST_PNG = encode(Image.fromarray(breast("test", 3)))


def assert_error(res: httpx.Response, status: int, field: str = None):
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert set(err) >= {"message", "type"} and err["message"] and err["type"]
    if field:
        assert field in err["message"], err["message"]
    return err


# ----------------------------------------------------------------------------------------------- endpoints


def test_healthz_and_models(served, client, replicas_at_start):
    _, url = served
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}  # no token needed
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["meddr"]


def test_diagnose_answers_a_label_the_vote_and_evidence_from_the_index(client, index_ids):
    version, ids = index_ids
    res = client.post("/v1/diagnose", json={"image": b64(TRAIN_PNG), "labels": LABELS, "modality": "breast ultrasound"})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["diagnosis"] in LABELS and isinstance(body["text"], str)
    assert body["vote"] in LABELS
    assert len(body["evidence"]) == 5  # rag.top_k_diagnosis
    assert all(e["id"] in ids and e["dataset"] == "breastmnist" and e["label"] in LABELS for e in body["evidence"])
    # the query is a training image: its own case comes first, found with the generator's single vision pass
    assert body["evidence"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    scores = [e["score"] for e in body["evidence"]]
    assert scores == sorted(scores, reverse=True)
    assert res.headers["x-meddr-index-version"] == version and res.headers["x-meddr-model-revision"] == "base"
    # top_k changes how many neighbours are retrieved and voted over
    three = client.post("/v1/diagnose", json={"image": data_url(TEST_PNG), "labels": LABELS, "top_k": 3}).json()
    assert len(three["evidence"]) == 3 and three["vote"] in LABELS


def test_vqa_and_report_carry_the_top1_evidence(client, index_ids):
    _, ids = index_ids
    vqa = client.post("/v1/vqa", json={"image": b64(TEST_PNG), "question": "Is there a lesion?"})
    assert vqa.status_code == 200, vqa.text
    assert isinstance(vqa.json()["answer"], str)
    assert [e["id"] in ids for e in vqa.json()["evidence"]] == [True]
    report = client.post("/v1/report", json={"image": b64(TEST_PNG), "modality": "breast ultrasound"})
    assert report.status_code == 200, report.text
    assert isinstance(report.json()["report"], str) and len(report.json()["evidence"]) == 1


def test_retrieval_scoped_to_a_dataset_by_the_request(client, index_ids):
    """``rag_datasets`` limits retrieval to the named datasets; evidence carries each image's annotations."""
    _, ids = index_ids
    body = {"image": b64(TEST_PNG), "labels": LABELS, "rag_datasets": ["breastmnist"]}
    res = client.post("/v1/diagnose", json=body)
    assert res.status_code == 200, res.text
    evidence = res.json()["evidence"]
    assert len(evidence) == 5 and len({e["id"] for e in evidence}) == 5  # five different images
    assert all(e["dataset"] == "breastmnist" and e["id"] in ids for e in evidence)
    assert all(e["label"] in LABELS and e["report"] is None and e["qa"] == [] for e in evidence)
    unscoped = client.post("/v1/diagnose", json={"image": b64(TEST_PNG), "labels": LABELS}).json()["evidence"]
    assert [e["id"] for e in unscoped] == [e["id"] for e in evidence]  # the index holds only breastmnist
    err = assert_error(client.post("/v1/vqa", json={"image": b64(TEST_PNG), "question": "Is there a lesion?",
                                                    "rag_datasets": ["slake"]}), 400, "'rag_datasets'")  # fmt: skip
    assert "['breastmnist']" in err["message"] and "slake" not in err["message"]  # names what is there


def test_rag_false_has_no_evidence_and_no_vote(client):
    res = client.post("/v1/diagnose", json={"image": b64(TEST_PNG), "labels": LABELS, "rag": False})
    assert res.status_code == 200, res.text
    assert res.json()["evidence"] == [] and res.json()["vote"] is None and res.json()["diagnosis"] in LABELS
    assert "x-meddr-index-version" not in res.headers
    assert client.post("/v1/report", json={"image": b64(TEST_PNG), "rag": False}).json()["evidence"] == []


def test_concurrent_requests_each_get_their_own_answer(client):
    """Requests answered in the same batch keep their own label sets and neighbours."""
    label_sets = [[f"class{i}a", f"class{i}b", f"class{i}c"] for i in range(8)]
    images = [encode(Image.fromarray(breast("test", i))) for i in range(8)]

    def ask(i):
        return client.post("/v1/diagnose", json={"image": b64(images[i]), "labels": label_sets[i]})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    alone = [client.post("/v1/diagnose", json={"image": b64(images[i]), "labels": label_sets[i]}) for i in (0, 5)]
    for i, res in enumerate(answers):
        assert res.status_code == 200, res.text
        assert res.json()["diagnosis"] in label_sets[i]
    for i, res in zip((0, 5), alone):  # the same neighbours in a batch as alone
        assert [e["id"] for e in res.json()["evidence"]] == [e["id"] for e in answers[i].json()["evidence"]]


# --------------------------------------------------------------------------------------- OpenAI client


def chat_messages(question="Is the lesion malignant?", image=TEST_PNG):
    return [
        {"role": "system", "content": "You are a radiologist."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": data_url(image)}},
            ],
        },
    ]


def test_openai_client_plain_and_streamed(served, index_ids):
    import openai

    _, url = served
    _, ids = index_ids
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    completion = oa.chat.completions.create(model="meddr", messages=chat_messages(), max_tokens=8)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert [e["id"] in ids for e in completion.model_extra["evidence"]] == [True]

    stream = oa.chat.completions.create(model="meddr", messages=chat_messages(), max_tokens=8, stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == choice.message.content  # greedy decoding: the same answer either way
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason

    plain = oa.chat.completions.create(model="meddr", messages=chat_messages(), extra_body={"rag": False})
    assert plain.model_extra["evidence"] == []
    with pytest.raises(openai.NotFoundError) as err:
        oa.chat.completions.create(model="gpt-4o", messages=chat_messages())
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


# ------------------------------------------------------------------------------------------------- auth


def test_auth(served, client):
    _, url = served
    body = {"image": b64(TEST_PNG), "labels": LABELS}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        res = httpx.post(f"{url}/v1/diagnose", json=body, headers=headers)
        assert_error(res, 401)
        assert res.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(f"{url}/v1/models"), 401)
    assert_error(httpx.post(f"{url}/v1/diagnose", content=b"{not json"), 401)  # before any parsing
    assert_error(httpx.get(f"{url}/openapi.json"), 401)
    assert client.post("/v1/diagnose", json=body).status_code == 200


# -------------------------------------------------------------------------------------------- bad input


def forged_png(width: int, height: int) -> bytes:
    """A PNG header claiming a huge image over a few bytes of data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


NOISE = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)))
ZEROS_BOMB = encode(Image.new("L", (2000, 2000)))  # 4 M pixels in a few kB

BAD_DIAGNOSE = {
    "missing image": ({"labels": LABELS}, 400, "image"),
    "missing labels": ({"image": b64(TEST_PNG)}, 400, "labels"),
    "extra field": ({"image": b64(TEST_PNG), "labels": LABELS, "temperature": 0.2}, 400, "temperature"),
    "labels not a list": ({"image": b64(TEST_PNG), "labels": "malignant"}, 400, "labels"),
    "label not a string": ({"image": b64(TEST_PNG), "labels": ["a", 3]}, 400, "labels[1]"),
    "top_k as a string": ({"image": b64(TEST_PNG), "labels": LABELS, "top_k": "5"}, 400, "top_k"),
    "rag not a bool": ({"image": b64(TEST_PNG), "labels": LABELS, "rag": "yes"}, 400, "rag"),
    "image not a string": ({"image": 12, "labels": LABELS}, 400, "image"),
    "empty labels": ({"image": b64(TEST_PNG), "labels": []}, 400, "labels"),
    "one label": ({"image": b64(TEST_PNG), "labels": ["malignant"]}, 400, "labels"),
    "blank label": ({"image": b64(TEST_PNG), "labels": ["a", "  "]}, 400, "labels[1]"),
    "too many labels": ({"image": b64(TEST_PNG), "labels": [f"l{i}" for i in range(101)]}, 400, "labels"),
    "repeated label": ({"image": b64(TEST_PNG), "labels": ["a", "A"]}, 400, "labels"),
    "top_k 0": ({"image": b64(TEST_PNG), "labels": LABELS, "top_k": 0}, 400, "top_k"),
    "top_k 51": ({"image": b64(TEST_PNG), "labels": LABELS, "top_k": 51}, 400, "top_k"),
    "empty image": ({"image": "", "labels": LABELS}, 400, "image"),
    "not base64": ({"image": "%%% not base64 %%%", "labels": LABELS}, 400, "image"),
    "image URL": ({"image": "https://example.org/x.png", "labels": LABELS}, 400, "image"),
    "data URL not base64": ({"image": "data:image/png,rawbytes", "labels": LABELS}, 400, "image"),
    "base64 of text": ({"image": b64(b"hello, this is not an image"), "labels": LABELS}, 422, "image"),
    "truncated PNG": ({"image": b64(TEST_PNG[: len(TEST_PNG) // 2]), "labels": LABELS}, 422, "image"),
    "truncated JPEG": ({"image": b64(encode(Image.fromarray(breast("test", 1)), "JPEG")[:300]), "labels": LABELS},
                       422, "image"),  # fmt: skip
    "GIF": ({"image": b64(encode(Image.new("P", (8, 8)), "GIF")), "labels": LABELS}, 422, "image"),
    "DICOM without pixels": ({"image": b64(b"\0" * 128 + b"DICM" + b"\0" * 64), "labels": LABELS}, 422, "image"),
    "bomb (pixel limit)": ({"image": b64(ZEROS_BOMB), "labels": LABELS}, 413, "image"),
    "bomb (forged 50000x50000)": ({"image": b64(forged_png(50_000, 50_000)), "labels": LABELS}, 413, "image"),
    "image over the byte limit": ({"image": b64(NOISE), "labels": LABELS}, 413, "image"),
    "rag_datasets not a list": ({"image": b64(TEST_PNG), "labels": LABELS, "rag_datasets": "breastmnist"}, 400,
                                "rag_datasets"),  # fmt: skip
    "rag_datasets empty": ({"image": b64(TEST_PNG), "labels": LABELS, "rag_datasets": []}, 400, "rag_datasets"),
    "rag_datasets blank": ({"image": b64(TEST_PNG), "labels": LABELS, "rag_datasets": [" "]}, 400, "rag_datasets[0]"),
    "rag_datasets not indexed": ({"image": b64(TEST_PNG), "labels": LABELS, "rag_datasets": ["chestmnist"]}, 400,
                                 "rag_datasets"),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BAD_DIAGNOSE))
def test_bad_diagnose_requests_get_a_4xx_naming_the_field(client, case):
    body, status, field = BAD_DIAGNOSE[case]
    err = assert_error(client.post("/v1/diagnose", json=body), status, f"'{field}")
    assert b64(TEST_PNG)[:40] not in err["message"]  # the message names the field, never echoes the image


def test_bodies_that_are_not_requests(client):
    assert_error(client.post("/v1/diagnose", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "not valid JSON")  # fmt: skip
    assert_error(client.post("/v1/diagnose", json=[1, 2]), 400, "JSON object")
    assert_error(client.post("/v1/vqa", json={"image": b64(TEST_PNG), "question": "   "}), 400, "'question'")
    assert_error(client.post("/v1/vqa", json={"image": b64(TEST_PNG)}), 400, "'question'")
    assert_error(client.post("/v1/report", json={"image": b64(TEST_PNG), "labels": LABELS}), 400, "'labels'")
    big = {"image": "A" * (MAX_BODY_BYTES + 10), "labels": LABELS}
    assert_error(client.post("/v1/diagnose", json=big), 413, "body")
    assert_error(client.post("/v1/segment", json={"image": b64(TEST_PNG)}), 404, "/v1/segment")
    assert_error(client.get("/v1/diagnose"), 405)


BAD_CHAT = {
    "unknown model": ({"model": "gpt-4o", "messages": chat_messages()}, 404, "model"),
    "no messages": ({"model": "meddr", "messages": []}, 400, "messages"),
    "no image": ({"model": "meddr", "messages": [{"role": "user", "content": "hello"}]}, 400, "messages"),
    "two images": ({"model": "meddr", "messages": chat_messages() + chat_messages()[1:]}, 400, "messages"),
    "unknown part type": ({"model": "meddr", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
                          400, "messages[0].content"),  # fmt: skip
    "last message not the user's": (
        {"model": "meddr", "messages": chat_messages() + [{"role": "assistant", "content": "ok"}]}, 400, "role"),
    "empty question": ({"model": "meddr", "messages": chat_messages(question=" ")}, 400, "content"),
    "n=2": ({"model": "meddr", "messages": chat_messages(), "n": 2}, 400, "n"),
    "max_tokens over the server's": ({"model": "meddr", "messages": chat_messages(), "max_tokens": 10_000}, 400,
                                     "max_tokens"),  # fmt: skip
    "temperature 3": ({"model": "meddr", "messages": chat_messages(), "temperature": 3}, 400, "temperature"),
    "unknown field": ({"model": "meddr", "messages": chat_messages(), "tools": []}, 400, "tools"),
    "image that is no image": ({"model": "meddr", "messages": chat_messages(image=b"GIF89a....")}, 422, "image_url"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT))
def test_bad_chat_requests_get_a_4xx_naming_the_field(client, case):
    body, status, field = BAD_CHAT[case]
    assert_error(client.post("/v1/chat/completions", json=body), status, field)


def test_the_replicas_survive_bad_input(client, replicas_at_start):
    """After every bad request above the same replicas answer: none died or was replaced."""
    from ray import serve

    res = client.post("/v1/diagnose", json={"image": b64(TEST_PNG), "labels": LABELS})
    assert res.status_code == 200, res.text
    status = serve.status().applications[APP]
    assert status.status == "RUNNING"
    for name, deployment in status.deployments.items():
        assert deployment.status == "HEALTHY", (name, deployment.message)
        assert {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()} == {"RUNNING": 1}, name
    assert replica_actors() == replicas_at_start


# ----------------------------------------------------------------------------------- unusual valid images


def dicom_ct() -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.set_pixel_data(np.linspace(0, 3000, 64 * 48, dtype=np.uint16).reshape(48, 64), "MONOCHROME2", 16)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


UNUSUAL = {
    "16-bit grey PNG": lambda: encode(Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)),
    "CMYK JPEG": lambda: encode(Image.new("CMYK", (40, 30), (10, 200, 30, 5)), "JPEG"),
    "palette PNG with transparency": lambda: encode(
        Image.fromarray(breast("test", 2)).convert("P"), "PNG", transparency=0
    ),
    "1x1 PNG": lambda: encode(Image.new("RGB", (1, 1), (200, 10, 10))),
    "very wide PNG": lambda: encode(Image.new("L", (4000, 3), 128)),
    "very tall JPEG": lambda: encode(Image.new("RGB", (2, 3000), (0, 90, 0)), "JPEG"),
    "RGBA PNG": lambda: encode(Image.new("RGBA", (30, 30), (1, 2, 3, 40))),
    "1-bit PNG": lambda: encode(Image.new("1", (33, 17), 1)),
    "DICOM CT, 16-bit with rescale and window": dicom_ct,
}


@pytest.mark.parametrize("case", list(UNUSUAL))
def test_unusual_but_valid_images_are_answered(client, case):
    res = client.post("/v1/diagnose", json={"image": b64(UNUSUAL[case]()), "labels": LABELS})
    assert res.status_code == 200, res.text
    assert res.json()["diagnosis"] in LABELS and len(res.json()["evidence"]) == 5



def test_logs_hold_ids_sizes_and_latencies_but_no_request_content(served):
    """Every request above left a line (endpoint, status, body size, latency); no image, question or token did."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    text = "\n".join(p.read_text(errors="replace") for p in logs.glob(f"replica_{APP}_*.log"))
    for line in ("POST /v1/diagnose -> 200", "POST /v1/diagnose -> 401", "POST /v1/diagnose -> 413",
                 "POST /v1/diagnose -> 422", "POST /v1/chat/completions -> 404", "generator: batch of"):  # fmt: skip
        assert line in text, line
    assert re.search(r"batch of [2-8] ", text), "concurrent requests were never batched"
    for secret in (b64(TEST_PNG)[100:160], b64(TRAIN_PNG)[100:160], b64(NOISE)[5000:5060], TOKEN,
                   "Is the lesion malignant", "Is there a lesion"):  # fmt: skip
        assert secret not in text


def test_metrics_reach_the_node_exporter(served):
    """The dashboard's metrics under their stable names, as Prometheus scrapes them from the node."""
    import ray

    from serve_apps.metrics import NAMES

    port = ray._private.worker.global_worker.node.metrics_export_port
    rejected = re.compile(r'ray_meddr_serve_requests_total\{[^}]*endpoint="/v1/diagnose"[^}]*status="413"')
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:  # Ray exports every few seconds, each series when its replica reports
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(f"ray_{name}" in text for name in NAMES) and rejected.search(text):
            break
        time.sleep(2)
    missing = [name for name in NAMES if f"ray_{name}" not in text]
    assert not missing, missing
    assert rejected.search(text), "no count of the 413 answers on /v1/diagnose"
