"""The tree's layers, from the code's own imports: ground → model → tasks → flows → top floor.

- ``core/`` (settings, contracts, layout, atomic I/O, processes) imports nothing of the project above it;
- ``model/`` imports only ``core`` (and never Prefect, Dask or the Label Studio SDK);
- ``tasks/`` imports ``core`` and ``model``; ``flows/`` imports everything below it;
- ``affectloop/`` (the CLI, status, the demo generator) is the top floor; nothing imports it.

Every import counts, including the ones inside functions (a lazy import is still a
dependency). A new upward import or an import cycle between modules fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "model": 1, "tasks": 2, "flows": 3, "affectloop": 4}
FORBIDDEN_IN_MODEL = ("prefect", "prefect_dask", "dask", "distributed", "label_studio_sdk")


def _modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path, name: str) -> set[str]:
    """Every module name ``path`` imports (absolute; relative imports resolved against ``name``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # "from pkg import module"
    return out


def _project_edges() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        edges[name] = {target for target in _imports(path, name) if target in MODULES and target != name}
    return edges


EDGES = _project_edges()


def test_the_tree_has_every_layer():
    assert {name.split(".")[0] for name in MODULES} == set(LAYERS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_layer_above_it(name):
    layer = LAYERS[name.split(".")[0]]
    upward = sorted(t for t in EDGES[name] if LAYERS[t.split(".")[0]] > layer)
    assert not upward, f"{name} (layer {layer}) imports {upward}, a layer above it"


def test_model_knows_nothing_of_prefect_dask_or_label_studio():
    for name, path in MODULES.items():
        if name.split(".")[0] == "model":
            bad = sorted(t for t in _imports(path, name) if t.split(".")[0] in FORBIDDEN_IN_MODEL)
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(EDGES[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(EDGES):
        if node not in state:
            visit(node)


def test_a_new_upward_import_is_caught(tmp_path):
    """The check itself can fail: a ground module importing a flow is reported as upward."""
    module = tmp_path / "bad.py"
    module.write_text("from flows.nightly_build import nightly_build\n", encoding="utf-8")
    assert "flows.nightly_build" in _imports(module, "core.bad")


# File names of datasets and state under the data root: only core/layout.py spells them.
LAYOUT_FILE_NAMES = ("ledger.parquet", "pending.parquet", "credentials.json", "watermark.json", "retrain.json",
                     "stopping_signal.json", "gold.parquet", "annotations.parquet", "groups.parquet",
                     "server.json", "selection.parquet", "holdout.json", "annotators.json", "reviews.parquet",
                     "flags.parquet", "overlap_raises.parquet", "review_ledger.parquet", "review_watermark.json")


def test_only_the_layout_names_files_under_the_data_root():
    offenders = []
    for name, path in MODULES.items():
        if name == "core.layout":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in LAYOUT_FILE_NAMES:
                offenders.append(f"{name}: {node.value!r}")
    assert not offenders, offenders
