"""Safe loading: models load in Keras safe mode, and nothing on an input path unpickles.

- A ``.keras`` file with a ``Lambda`` layer (arbitrary Python code) is refused by
  ``FusionClassifier.load`` and by the registry (``ModelLoadError`` naming the file), and
  its code never runs; the same file loaded *without* safe mode does run it, which is the
  attack the refusal prevents.
- The project's source (``affectloop/``, ``tasks/``, ``flows/``, ``model/``, ``bench/``) is
  parsed and searched for unsafe deserialisation: pickle and its relatives (cloudpickle,
  dill, joblib, shelve, marshal, jsonpickle), ``pandas.read_pickle``,
  ``np.load(allow_pickle=True)``, ``yaml.load`` without a safe loader, ``safe_mode=False``,
  Keras' ``enable_unsafe_deserialization``, and any ``load_model`` call without an explicit
  ``safe_mode=True``. ``ALLOWED`` lists the legitimate exceptions: none today. (Dask
  pickles tasks between its own processes; that is transport between trusted processes of
  one cluster, not an input path, and not in this source tree.)
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("affectloop", "tasks", "flows", "model", "bench")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal", "jsonpickle"}
UNSAFE_CALLS = {"read_pickle", "unsafe_load", "full_load", "enable_unsafe_deserialization"}
# "path relative to the repository:line" -> why it is safe. Keep empty unless you must.
ALLOWED: dict[str, str] = {}


# ---------------------------------------------------------------------------------- Keras safe mode


def _lambda_model(path: Path, marker: Path) -> Path:
    """Save a model whose Lambda layer writes ``marker`` when it runs (stands in for any code)."""
    import keras

    # A Python lambda (not a named function) is what Keras stores as bytecode; the path is a
    # constant in that bytecode (Keras fails to restore lambdas with default arguments).
    payload = eval(f"lambda x: (open({str(marker)!r}, 'w').write('arbitrary code ran'), x)[1]")  # noqa: S307
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Lambda(payload)(inputs)).save(path)
    marker.unlink(missing_ok=True)  # building the model ran it once, here, on purpose
    return path


def test_a_keras_file_with_a_lambda_layer_is_refused_and_its_code_never_runs(tmp_path):
    import keras

    from model.estimator import FusionClassifier
    from model.registry import ModelLoadError, ModelRegistry

    marker = tmp_path / "pwned"
    path = _lambda_model(tmp_path / "evil.keras", marker)
    with pytest.raises(ValueError, match="(?i)lambda|unsafe|safe_mode"):
        FusionClassifier.load(path)
    assert not marker.exists()

    # Registered with a valid card and checksum, and promoted: the registry still refuses it.
    version = "v0001-20261130T120000Z"
    folder = tmp_path / "models" / version
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(path.read_bytes())
    (folder / "model_card.json").write_text(json.dumps(
        {"labels": ["a", "b"], "model_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}))
    registry = ModelRegistry(tmp_path / "models")
    registry.promote(version)
    with pytest.raises(ModelLoadError, match=str(folder / "model.keras")):
        registry.load_production()
    assert not marker.exists()

    # What safe mode prevents: without it, loading the file runs its code.
    keras.saving.load_model(path, safe_mode=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------- source scan


def unsafe_deserialisation(source: str, filename: str) -> list[str]:
    """``filename:line: what`` for every unsafe deserialisation construct in ``source``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in UNSAFE_MODULES:
                found.append(f"{where}: from {node.module} import …")
            found += [f"{where}: import {a.name}" for a in node.names if a.name in UNSAFE_CALLS]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords if k.arg}

            def is_const(key: str, value: object) -> bool:
                return isinstance(keywords.get(key), ast.Constant) and keywords[key].value == value

            if name in UNSAFE_CALLS:
                found.append(f"{where}: {name}()")
            if is_const("allow_pickle", True):
                found.append(f"{where}: {name}(allow_pickle=True)")
            if "safe_mode" in keywords and not is_const("safe_mode", True):
                found.append(f"{where}: {name}(safe_mode=<not True>)")
            if name == "load_model" and "safe_mode" not in keywords:
                found.append(f"{where}: load_model() without an explicit safe_mode=True")
            if owner == "yaml" and name == "load":
                loader = keywords.get("Loader")
                if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                    found.append(f"{where}: yaml.load without SafeLoader")
    return found


@pytest.mark.parametrize("snippet", [
    "import pickle", "import cloudpickle as cp", "from joblib import load", "import dill",
    "import marshal", "from pandas import read_pickle", "df = pd.read_pickle(path)",
    "x = np.load(path, allow_pickle=True)", "yaml.load(text)", "yaml.unsafe_load(text)",
    "keras.saving.load_model(path, safe_mode=False)", "keras.saving.load_model(path)",
    "keras.config.enable_unsafe_deserialization()", "from _pickle import loads",
])
def test_the_scanner_catches_unsafe_loading(snippet):
    assert unsafe_deserialisation(snippet, "snippet.py"), snippet


@pytest.mark.parametrize("snippet", [
    "x = np.load(path)", "x = np.load(path, allow_pickle=False)", "json.loads(text)",
    "keras.saving.load_model(path, safe_mode=True, compile=False)", "yaml.load(text, Loader=yaml.SafeLoader)",
    "yaml.safe_load(text)", "pq.read_table(path)",
])
def test_the_scanner_lets_safe_loading_through(snippet):
    assert unsafe_deserialisation(snippet, "snippet.py") == []


def test_no_unsafe_deserialisation_in_the_project_source():
    files = sorted(p for folder in SCANNED if (REPO / folder).is_dir() for p in (REPO / folder).rglob("*.py"))
    assert len(files) > 20  # the scan really covers the project
    found = []
    for path in files:
        rel = str(path.relative_to(REPO))
        found += [hit for hit in unsafe_deserialisation(path.read_text(encoding="utf-8"), rel)
                  if hit.split(": ", 1)[0] not in ALLOWED]
    assert found == [], "unsafe deserialisation (add to ALLOWED only with a reason):\n" + "\n".join(found)


def test_model_loading_goes_through_safe_mode():
    """The one place models are loaded passes safe_mode=True explicitly."""
    source = (REPO / "model" / "estimator.py").read_text(encoding="utf-8")
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "load_model"]
    assert calls and all(any(k.arg == "safe_mode" and getattr(k.value, "value", None) is True for k in c.keywords)
                         for c in calls)
