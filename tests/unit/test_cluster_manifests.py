"""The cluster files under cluster/: every manifest parses; the KubeRay ones use only fields of KubeRay's ray.io/v1
CRDs (the hand-vendored subset tests/assets/kuberay_crd_v1_subset.json), at any depth it covers; every script,
preset, override, import path and file they name exists and loads; the cluster launcher YAML passes Ray's own
validation; and the generated files (RayJobs, RayService, Grafana dashboard) follow their sources
(scripts/gen_cluster_manifests.py --check), whose metric names the code defines."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCHEMA = json.loads((ROOT / "tests" / "assets" / "kuberay_crd_v1_subset.json").read_text())
SHARED_MOUNT = "/mnt/shared"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _load_script("gen_cluster_manifests")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _kuberay_manifests() -> List[Path]:
    return sorted(p for p in KUBERAY.glob("*.yaml") if isinstance(_yaml(p), dict) and "kind" in _yaml(p))


# --------------------------------------------------------------------------------- the schema subset


def schema_errors(value: Any, type_expr: str, where: str) -> List[str]:
    """What in ``value`` does not fit ``type_expr`` of the vendored subset (unknown keys, missing required
    keys, wrong types), each naming its path."""
    types = SCHEMA["types"]
    if type_expr.startswith("[]"):
        if not isinstance(value, list):
            return [f"{where}: a list expected, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, type_expr[2:], f"{where}[{i}]")]
    if type_expr.startswith("map[string]"):
        if not isinstance(value, dict):
            return [f"{where}: a mapping expected, got {type(value).__name__}"]
        inner = type_expr[len("map[string]"):]
        return [e for k, v in value.items() for e in schema_errors(v, inner, f"{where}.{k}")]
    if type_expr.startswith("const:"):
        want = type_expr[len("const:"):]
        return [] if value == want else [f"{where}: {value!r}, expected {want!r}"]
    if type_expr.startswith("enum:"):
        allowed = type_expr[len("enum:"):].split(",")
        return [] if value in allowed else [f"{where}: {value!r} is not one of {allowed}"]
    scalar = {
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "quantity": lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
        "object": lambda v: isinstance(v, dict),
    }
    if type_expr in scalar:
        return [] if scalar[type_expr](value) else [f"{where}: {type_expr} expected, got {value!r}"]
    spec = types[type_expr]  # a KeyError here is a typo in the vendored file itself
    if not isinstance(value, dict):
        return [f"{where}: a {type_expr} mapping expected, got {type(value).__name__}"]
    errors = [f"{where}: unknown field {k!r} (not in KubeRay v1 {type_expr})" for k in value
              if k not in spec["fields"]]
    errors += [f"{where}: required field {k!r} of {type_expr} missing" for k in spec.get("required", [])
               if k not in value]
    for key, sub in value.items():
        if key in spec["fields"]:
            errors += schema_errors(sub, spec["fields"][key], f"{where}.{key}")
    return errors


def manifest_errors(doc: Dict[str, Any]) -> List[str]:
    kind = doc.get("kind")
    if kind not in SCHEMA["kinds"]:
        return [f"kind {kind!r} is not covered ({sorted(SCHEMA['kinds'])})"]
    return schema_errors(doc, kind, kind)


def test_the_vendored_subset_says_what_it_is():
    about = " ".join(SCHEMA["_about"])
    assert "HAND-VENDORED SUBSET" in about and SCHEMA["kuberay_version"] in about
    for name, spec in SCHEMA["types"].items():  # every type it names is defined (or a scalar form)
        for field, t in spec["fields"].items():
            base = re.sub(r"^(\[\]|map\[string\])+", "", t)
            assert (base in SCHEMA["types"] or base.split(":")[0] in ("const", "enum")
                    or base in ("string", "boolean", "integer", "number", "quantity", "object")), (name, field, t)


def test_every_cluster_file_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 10, files
    for path in files:
        assert isinstance(_yaml(path), dict), f"{path}: not a YAML mapping"
    for path in CLUSTER.rglob("*.json"):
        assert isinstance(json.loads(path.read_text()), dict), path


@pytest.mark.parametrize("path", _kuberay_manifests(), ids=lambda p: p.name)
def test_manifest_fields_are_kuberay_v1(path):
    assert manifest_errors(_yaml(path)) == []


def test_schema_check_rejects_unknown_misplaced_and_missing_fields():
    good = _yaml(KUBERAY / "raycluster.yaml")
    assert manifest_errors(good) == []
    bad = copy.deepcopy(good)
    bad["spec"]["workerGroupSpec"] = bad["spec"].pop("workerGroupSpecs")  # typo at the top of the spec
    gpu = bad["spec"]["workerGroupSpec"][1]
    container = gpu["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")  # typo deep in a pod template
    bad["spec"]["enableInTreeAutoscaling"] = "true"  # a string, not a boolean
    del bad["spec"]["headGroupSpec"]["template"]
    errors = manifest_errors(bad)
    joined = "\n".join(errors)
    assert "RayCluster.spec: unknown field 'workerGroupSpec'" in joined
    assert "RayCluster.spec.enableInTreeAutoscaling: boolean expected" in joined
    assert "RayCluster.spec.headGroupSpec: required field 'template' of HeadGroupSpec missing" in joined
    # the renamed list is no longer checked (unknown key), so check the container typo through a RayJob
    job = _yaml(KUBERAY / "rayjob-finetune.yaml")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resource"] = {}
    job["spec"]["entrypointNumGPUs"] = 0
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] = {
        "name": "meddr-shared"}
    job_errors = "\n".join(manifest_errors(job))
    assert "containers[0]: unknown field 'resource'" in job_errors
    assert "volumes[0].persistentVolumeClaim: unknown field 'name'" in job_errors
    assert "required field 'claimName' of PersistentVolumeClaimVolumeSource missing" in job_errors
    assert "RayJob.spec: unknown field 'entrypointNumGPUs'" in job_errors
    assert manifest_errors({"apiVersion": "ray.io/v1alpha1", "kind": "RayJob", "metadata": {"name": "x"},
                            "spec": {}}) == ["RayJob.apiVersion: 'ray.io/v1alpha1', expected 'ray.io/v1'"]


# ------------------------------------------------------------------------------------------ the cluster


def _containers(cluster_spec: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any], Dict[str, Any]]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in
                                                          cluster_spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            yield name, pod, container


def test_raycluster_has_a_cpu_only_head_and_an_autoscaling_gpu_group_on_shared_storage():
    spec = _yaml(KUBERAY / "raycluster.yaml")["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for g in gpu_groups:
        assert g["minReplicas"] < g["maxReplicas"], f"{g['groupName']}: does not autoscale"
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    claim = _yaml(KUBERAY / "shared-storage.yaml")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for group, pod, container in _containers(spec):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert SHARED_MOUNT in mounts, f"{group}: {SHARED_MOUNT} not mounted"
        assert volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert container["image"] == spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def test_the_paper_preset_keeps_its_files_on_the_shared_mount():
    from meddr_ray.config import load_config

    cfg = load_config("paper")
    for what, path in (("run_dir", cfg.run_dir), ("teacher.path", cfg.teacher.path),
                       ("student.path", cfg.student.path)):
        assert str(path).startswith(SHARED_MOUNT + "/"), f"paper {what}={path} is not on {SHARED_MOUNT}"


def test_image_tag_is_the_project_version_everywhere():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for p in _kuberay_manifests() for d in [_yaml(p)] if d["kind"] != "PersistentVolumeClaim"
              for spec in [d["spec"].get("rayClusterSpec") or d["spec"].get("rayClusterConfig") or d["spec"]]
              for _, _, c in _containers(spec)}
    images.add(_yaml(CLUSTER / "cluster-launcher.yaml")["docker"]["image"])
    assert {i.rsplit("/", 1)[-1] for i in images} == {f"meddr-ray:{version}"}, images
    assert f"-t meddr-ray:{version} ." in (CLUSTER / "Dockerfile").read_text()


# ------------------------------------------------------------------------------------------- RayJobs


def _rayjobs() -> Dict[str, Dict[str, Any]]:
    return {p.name: _yaml(p) for p in _kuberay_manifests() if _yaml(p)["kind"] == "RayJob"}


def _stage_of(script: Path) -> str:
    found = re.search(r'main\(\["([a-z_]+)"', script.read_text())
    assert found, f"{script}: does not call meddr_ray.cli.main([stage, ...])"
    return found.group(1)


def test_one_rayjob_per_stage_and_for_the_pipeline():
    scripts = {f"jobs/{p.name}" for p in (ROOT / "jobs").glob("*.py")} - {"jobs/serve.py"}  # serve: RayService
    named = {shlex.split(job["spec"]["entrypoint"])[1] for job in _rayjobs().values()}
    assert named == scripts
    assert not (CLUSTER / "rayjob-pipeline.yaml").exists(), "moved to cluster/kuberay/"


@pytest.mark.parametrize("name", sorted(_rayjobs()))
def test_rayjob_fields(name):
    spec = _rayjobs()[name]["spec"]
    assert spec["entrypointNumGpus"] == 0  # the drivers plan and wait; actors and train workers hold the GPUs
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _dockerfile_workdir()
    assert spec["rayClusterSpec"] == _yaml(KUBERAY / "raycluster.yaml")["spec"]


@pytest.mark.parametrize("name", sorted(_rayjobs()))
def test_rayjob_entrypoint_names_a_script_a_preset_and_overrides_that_load(name):
    from meddr_ray.cli import build_parser
    from meddr_ray.config import load_config

    argv = shlex.split(_rayjobs()[name]["spec"]["entrypoint"])
    assert argv[0] == "python", argv
    script = ROOT / argv[1]
    assert script.is_file(), f"{name}: {argv[1]} does not exist"
    args = build_parser().parse_args([_stage_of(script), *argv[2:]])
    if "/" not in args.config and not args.config.endswith(".yaml"):
        assert (ROOT / "meddr_ray" / "configs" / f"{args.config}.yaml").is_file(), f"{name}: no preset {args.config}"
    load_config(args.config, args.overrides)


# ----------------------------------------------------------------------------------------- RayService


def test_rayservice_serves_the_project_app_on_the_same_cluster():
    from ray.serve.schema import ServeDeploySchema

    from meddr_ray.config import load_config
    from serve_apps.meddr import AppArgs

    doc = _yaml(KUBERAY / "rayservice.yaml")
    assert doc["spec"]["rayClusterConfig"] == _yaml(KUBERAY / "raycluster.yaml")["spec"]
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)
    assert serve["applications"], "no application"
    for app in serve["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        assert callable(builder), app["import_path"]
        args = AppArgs.model_validate(app.get("args") or {})
        load_config(args.config, args.overrides)
    local = _yaml(ROOT / "serve_apps" / "meddr.yaml")
    assert [a["import_path"] for a in serve["applications"]] == [a["import_path"] for a in local["applications"]]


# --------------------------------------------------------------------------------- generated = sources


def test_generated_files_are_up_to_date():
    stale = gen.stale()
    assert stale == [], f"stale: {[str(p.relative_to(ROOT)) for p in stale]}; run scripts/gen_cluster_manifests.py"
    assert gen.main(["--check"]) == 0


def test_drift_of_a_source_makes_the_check_fail(tmp_path, monkeypatch, capsys):
    changed = _yaml(ROOT / "serve_apps" / "meddr.yaml")
    changed["applications"][0]["route_prefix"] = "/meddr"
    edited = tmp_path / "meddr.yaml"
    edited.write_text(yaml.safe_dump(changed))
    monkeypatch.setattr(gen, "SERVE_CONFIG", edited)
    assert gen.stale() == [gen.RAYSERVICE]
    assert gen.main(["--check"]) == 1
    assert "stale: cluster/kuberay/rayservice.yaml" in capsys.readouterr().out

    monkeypatch.undo()
    cluster = tmp_path / "raycluster.yaml"
    cluster.write_text((KUBERAY / "raycluster.yaml").read_text().replace('rayVersion: "2.60.0"', 'rayVersion: "2.61.0"'))
    monkeypatch.setattr(gen, "RAYCLUSTER", cluster)
    assert set(gen.stale()) == {gen.RAYSERVICE, *(gen.rayjob_path(s) for s in gen.RAY_JOBS)}

    monkeypatch.undo()
    monkeypatch.setattr(gen, "METRICS", gen.METRICS[:-1])
    assert gen.stale() == [gen.DASHBOARD]


def test_a_serve_overlay_naming_no_application_is_refused(tmp_path, monkeypatch):
    overlay = tmp_path / "serve-cluster.yaml"
    overlay.write_text("applications:\n  - name: medd\n    args: {config: paper}\n")
    monkeypatch.setattr(gen, "SERVE_OVERLAY", overlay)
    with pytest.raises(SystemExit, match="application 'medd' is not in"):
        gen.serve_config()
    overlay.write_text("applications:\n  - name: meddr\n    route_prefix: 7\n")
    with pytest.raises(SystemExit, match="not a valid Serve config"):
        gen.serve_config()


# ---------------------------------------------------------------------------------------------- Grafana

DEFINITION = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"([A-Za-z_:][A-Za-z0-9_:]*)\"", re.S)
SERIES = re.compile(r"\bray_([A-Za-z0-9_]+)")


def defined_metrics(folders: List[Path]) -> Dict[str, str]:
    """Metric name -> kind (counter/gauge/histogram) of every ray.util.metrics / ray.serve.metrics definition in
    the Python files under ``folders``."""
    found: Dict[str, str] = {}
    for folder in folders:
        for path in folder.rglob("*.py"):
            for kind, name in DEFINITION.findall(path.read_text(errors="replace")):
                found[name] = kind.lower()
    return found


def _ray_serve_source() -> Path:
    return Path(importlib.util.find_spec("ray").submodule_search_locations[0]) / "serve"


def _dashboard_series() -> List[str]:
    dashboard = json.loads((CLUSTER / "grafana" / "meddr-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "no panel queries"
    return sorted({s for e in exprs for s in SERIES.findall(e)})


def _base_and_kind(series: str) -> Tuple[str, str]:
    for suffix, kind in (("_total", "counter"), ("_bucket", "histogram"), ("_sum", "histogram"),
                         ("_count", "histogram")):
        if series.endswith(suffix):
            return series[: -len(suffix)], kind
    return series, "gauge"


def test_every_dashboard_metric_is_defined_in_the_code_with_its_kind():
    project = defined_metrics([ROOT / "meddr_ray", ROOT / "serve_apps"])
    ray_serve = defined_metrics([_ray_serve_source()])
    assert "meddr_bootstrap_reports_written" in project and "serve_deployment_replica_healthy" in ray_serve
    for series in _dashboard_series():
        base, kind = _base_and_kind(series)
        where = project if base.startswith("meddr_") else ray_serve
        assert base in where, f"dashboard series ray_{series}: no metric {base!r} is defined in the code"
        assert where[base] == kind, f"ray_{series}: {base} is a {where[base]} in the code, read as a {kind}"


def test_every_metric_the_project_defines_is_on_the_dashboard():
    shown = {_base_and_kind(s)[0] for s in _dashboard_series()}
    missing = sorted(set(defined_metrics([ROOT / "meddr_ray", ROOT / "serve_apps"])) - shown)
    assert missing == [], f"add {missing} to METRICS in scripts/gen_cluster_manifests.py and run it"


def test_a_renamed_metric_fails_the_dashboard_check(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text('Counter(\n    "meddr_bootstrap_reports_done", "renamed")\n')
    assert defined_metrics([src]) == {"meddr_bootstrap_reports_done": "counter"}
    assert "meddr_bootstrap_reports_written" not in defined_metrics([src])


# ------------------------------------------------------------------------------- launcher and Dockerfile


def test_cluster_launcher_passes_rays_validation_and_keeps_the_layout():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml(CLUSTER / "cluster-launcher.yaml")
    validate_config(prepare_config(copy.deepcopy(raw)))
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"].get("GPU") == 0
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] <= t["max_workers"] for t in gpu)
    assert sum(t["max_workers"] for n, t in types.items() if n != raw["head_node_type"]) == raw["max_workers"]
    assert any(f"{SHARED_MOUNT}:{SHARED_MOUNT}" in o for o in raw["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    assert raw["setup_commands"], "no setup commands"


def _dockerfile_workdir() -> str:
    found = re.findall(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert len(found) == 1, found
    return found[0]


def test_dockerfile_base_copies_and_workdir():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+rayproject/ray:(\S+)-py(\d)(\d+)-gpu\s*$", text, re.M)
    assert base, "not based on a rayproject/ray GPU image"
    import ray

    assert base.group(1) == ray.__version__
    for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert _dockerfile_workdir() == gen.IMAGE_PROJECT_DIR


# ----------------------------------------------------------------------------- every named file exists

PATH_REF = re.compile(r"(?<![\w/.-])((?:cluster|jobs|serve_apps|scripts|requirements|docs|meddr_ray|tests)/"
                      r"[\w./*<>-]*[\w*>])")


def test_every_repository_path_the_cluster_files_name_exists():
    texts = [p for p in CLUSTER.rglob("*") if p.is_file()] + [ROOT / "scripts" / "gen_cluster_manifests.py"]
    missing = []
    for path in texts:
        for ref in PATH_REF.findall(path.read_text()):
            if "<" in ref or "*" in ref:
                continue
            if not (ROOT / ref).exists():
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert missing == []
