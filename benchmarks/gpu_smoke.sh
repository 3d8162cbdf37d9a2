#!/usr/bin/env bash
# GPU smoke run: the whole recipe on ONE GPU with the gpu1 preset (SmolLM2-135M teacher and student, BreastMNIST),
# in a few minutes, on a local Ray cluster with token authentication; then prints the figures:
#   bootstrap tokens/s (teacher), train samples/s (+ tokens/s), index embeddings/s, evaluation rows/s, and
#   Serve request latency (p50 / p95 of POST /v1/diagnose, one client, then 8 concurrent clients).
#
#   benchmarks/gpu_smoke.sh                      # work folder: a new /tmp/meddr-gpu-smoke.XXXXXX
#   WORK=/data/smoke benchmarks/gpu_smoke.sh     # keep the run (re-running resumes every stage)
#   PRESET=gpu1 REQUESTS=64 benchmarks/gpu_smoke.sh key=value ...   # config overrides go to every stage
#
# Needs: a CUDA GPU, `make install` (the venv in .venv, or PY=...), torch with CUDA. Record the printed figures
# with the machine in benchmarks/RESULTS.md. The cluster it starts is stopped on exit (also on failure).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
RAY=${RAY:-$(dirname "$PY")/ray}
export PRESET=${PRESET:-gpu1}
REQUESTS=${REQUESTS:-32}
WORK=${WORK:-$(mktemp -d /tmp/meddr-gpu-smoke.XXXXXX)}
RUN="$WORK/run"
OVERRIDES=("run_dir=$RUN" "$@")
mkdir -p "$WORK"

"$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_smoke: no CUDA GPU visible to torch; this script is for a GPU machine (the tests need none)")
print(f"gpu_smoke: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

# DeepSpeed must probe CUDA here (the CPU tests set DS_ACCELERATOR=cpu); workers get the variables of runtime.py.
unset DS_ACCELERATOR
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# ---- a local cluster with token authentication (docs/operations.md, "Authentication"), stopped on exit
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$WORK/ray_auth_token"
if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    HOME="$WORK/home" "$RAY" get-auth-token --generate >/dev/null   # writes $WORK/home/.ray/auth_token
    cp "$WORK/home/.ray/auth_token" "$RAY_AUTH_TOKEN_PATH"
fi
RAY_TMP=$(mktemp -d /tmp/rgs.XXXXXX)   # short: Ray's socket paths live under it
GCS_PORT=${GCS_PORT:-6390}
# `ray start --block` in its own session: stopping it (and only it, not every Ray on the machine as `ray stop`
# would) takes its processes down.
setsid "$RAY" start --head --block --temp-dir "$RAY_TMP" --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
    --num-gpus 1 --dashboard-host 127.0.0.1 --disable-usage-stats >"$WORK/ray-start.log" 2>&1 &
RAY_PID=$!
stop_cluster() {
    kill -TERM -- "-$RAY_PID" 2>/dev/null || true
    wait "$RAY_PID" 2>/dev/null || true
    rm -rf "$RAY_TMP"
}
trap stop_cluster EXIT
export RAY_ADDRESS=127.0.0.1:$GCS_PORT
for _ in $(seq 60); do
    "$RAY" status --address "$RAY_ADDRESS" >/dev/null 2>&1 && break
    kill -0 "$RAY_PID" 2>/dev/null || { cat "$WORK/ray-start.log"; exit 1; }
    sleep 2
done

export MEDDR_SERVE_TOKEN=${MEDDR_SERVE_TOKEN:-$("$PY" -c 'import secrets; print(secrets.token_hex(16))')}
stage() {  # stage <name>: `meddr-ray <name> --config $PRESET run_dir=... <overrides>`, timed
    local name=$1; shift
    local t0=$SECONDS
    echo "== meddr-ray $name --config $PRESET ${OVERRIDES[*]} $*"
    "$PY" -m meddr_ray.cli "$name" --config "$PRESET" "${OVERRIDES[@]}" "$@"
    echo "== $name: $((SECONDS - t0)) s"
}
# The steps, in the pipeline's order: meddr-ray bootstrap, meddr-ray instruct, meddr-ray train, meddr-ray index,
# meddr-ray evaluate, meddr-ray serve.
stage bootstrap
stage instruct
stage train
stage index
stage evaluate
stage serve --detach

# ---- request latency: POST /v1/diagnose with BreastMNIST test images, retrieval on
"$PY" - "$RUN" "$REQUESTS" <<'EOF'
import base64, concurrent.futures as cf, io, json, os, statistics, sys, time
import httpx, numpy as np
from PIL import Image
from meddr_ray.config import load_config

run, n = sys.argv[1], int(sys.argv[2])
cfg = load_config(os.environ.get("PRESET", "gpu1"), [f"run_dir={run}"])
arrays = np.load(cfg.index.sources[0].path)
images = arrays["test_images"][:n]
def png(a):
    buf = io.BytesIO(); Image.fromarray(a).save(buf, format="PNG"); return base64.b64encode(buf.getvalue()).decode()
bodies = [{"image": png(a), "labels": ["malignant", "normal, benign"]} for a in images]
url = f"http://127.0.0.1:{cfg.serve.port}"
headers = {"Authorization": f"Bearer {os.environ['MEDDR_SERVE_TOKEN']}"}
with httpx.Client(base_url=url, headers=headers, timeout=300) as c:
    for _ in range(60):  # the application may still be loading the student
        try:
            if c.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(2)
    for b in bodies[:4]:  # warm-up: first CUDA kernels, first batch
        c.post("/v1/diagnose", json=b).raise_for_status()
    def one(b):
        t = time.perf_counter(); r = c.post("/v1/diagnose", json=b); r.raise_for_status()
        return time.perf_counter() - t
    serial = [one(b) for b in bodies]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(one, bodies))
    wall = time.perf_counter() - t0
def q(xs, p): return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]
print(json.dumps({
    "serve_latency_s_1_client": {"p50": round(statistics.median(serial), 4), "p95": round(q(serial, 0.95), 4)},
    "serve_latency_s_8_clients": {"p50": round(statistics.median(loaded), 4), "p95": round(q(loaded, 0.95), 4),
                                  "requests_per_s": round(len(loaded) / wall, 2)},
}), file=open(os.path.join(run, "serve_latency.json"), "w"))
EOF

# ---- the figures, from what each stage wrote
"$PY" - "$RUN" <<'EOF'
import json, os, sys
run = sys.argv[1]
def load(*parts):
    with open(os.path.join(run, *parts)) as f:
        return json.load(f)
boot = load("bootstrap", "summary.json")
adapter = load("adapter", "meddr.json")
windows = [h for h in adapter["history"] if "samples_per_s" in h][1:] or \
          [h for h in adapter["history"] if "samples_per_s" in h]  # the first window holds start-up
current = open(os.path.join(run, "index", "CURRENT")).read().strip()
index = load("index", current, "manifest.json")
lat = load("serve_latency.json")
build_s = index.get("summary", {}).get("build_seconds")
print(f"bootstrap   tokens/s   {boot['tokens_per_s']:.0f}   ({boot['written']} reports, {boot['tokens']} tokens)")
print(f"train       samples/s  {sum(h['samples_per_s'] for h in windows) / len(windows):.1f}   "
      f"tokens/s {sum(h['tokens_per_s'] for h in windows) / len(windows):.0f}   "
      f"(final loss {adapter['final_metrics']['loss']:.3f}, {adapter['final_metrics']['step']} steps)")
print(f"index       {index['count']} embeddings" + (f", build {build_s} s" if build_s is not None else ""))
one, eight = lat["serve_latency_s_1_client"], lat["serve_latency_s_8_clients"]
print(f"serve       latency    p50 {one['p50'] * 1000:.0f} ms  p95 {one['p95'] * 1000:.0f} ms (1 client); "
      f"p50 {eight['p50'] * 1000:.0f} ms  p95 {eight['p95'] * 1000:.0f} ms, {eight['requests_per_s']} req/s (8 clients)")
print(f"evaluate    {os.path.join(run, 'eval', 'report.md')}")
EOF
