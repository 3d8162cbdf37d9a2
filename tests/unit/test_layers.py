"""The layering of the package (README, "Architecture"): a module may import from its own layer and the layers
below it, never from one above. Every import counts, also those inside functions."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# lowest first; a module belongs to the first layer with a prefix of its dotted name
LAYERS = [
    ("basics", ("meddr_ray.config", "meddr_ray.layout", "meddr_ray.storage", "meddr_ray.progress", "meddr_ray.prompts",
                "meddr_ray.metrics", "meddr_ray.report_sections", "meddr_ray.data")),
    ("model", ("meddr_ray.model",)),
    ("retrieval", ("meddr_ray.retrieval",)),
    ("stages", ("meddr_ray.stages",)),
    ("entry points", ("meddr_ray.cli", "meddr_ray.demo", "serve_apps", "jobs")),
]  # fmt: skip


def layer_of(module: str):
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def modules():
    for folder in ("meddr_ray", "serve_apps", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            if name != "meddr_ray":  # the package's own (empty) __init__
                yield name, path


def imports_of(module: str, path: Path):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports the module
                yield node.lineno, f"{base}.{alias.name}" if layer_of(f"{base}.{alias.name}") is not None else base


def upward_imports():
    found = []
    for module, path in modules():
        own = layer_of(module)
        assert own is not None, f"{module} is in no layer: add it to LAYERS (and to the README's table)"
        for line, imported in imports_of(module, path):
            theirs = layer_of(imported)
            if theirs is not None and theirs > own:
                found.append(f"{path.relative_to(ROOT)}:{line}: {LAYERS[own][0]} imports {imported} "
                             f"({LAYERS[theirs][0]})")  # fmt: skip
    return found


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself: a basics module that imports a stage is reported."""
    fake = tmp_path / "meddr_ray" / "data"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from meddr_ray.stages.index import run_index\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert upward_imports() == ["meddr_ray/data/bad.py:2: basics imports meddr_ray.stages.index.run_index (stages)"]
    finally:
        ROOT = saved


def below_stages():
    """Every module of the basics, model and retrieval layers, with its file."""
    return [(m, p) for m, p in modules() if (layer_of(m) or 0) < layer_of("meddr_ray.stages")]


@pytest.mark.parametrize("module,path", below_stages(), ids=[m for m, _ in below_stages()])
def test_lower_layers_do_not_import_ray_at_module_level(module, path):
    """Below the stages nothing imports Ray when the module is imported (the CLI's help and config commands,
    Serve's replicas and the unit tests import them without starting or needing it)."""
    top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n == "ray" or n.startswith("ray.")]
