"""The package's public face: ``__all__``, lazy exports that stay light, errors that are builtins too, and
``analyze_image`` giving what ``analyze`` writes."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

import latentharmonize as lh
from latentharmonize import errors

from test_analyze import bundle_dir, scan  # noqa: F401  (fixtures reused)

PACKAGE = Path(lh.__file__).parent
# The product path: CT in, tissue map out. It never imports the research wing or the batch runner.
PRODUCT = ("pipeline", "analyze_command", "report_command", "worker", "worker_protocol", "slicer_bridge", "io",
           "lungmask", "grid", "structures", "segments", "composition", "writers", "render", "bundle", "outputs",
           "progress")
RESEARCH = {"training", "evaluation", "phantom", "batch", "bench"}


def test_all_lists_resolvable_names():
    assert len(set(lh.__all__)) == len(lh.__all__)
    for name in lh.__all__:
        assert getattr(lh, name) is not None, name
    assert lh.analyze.__module__ == "latentharmonize.analyze_command"
    assert callable(lh.analyze_image) and isinstance(lh.__version__, str)
    assert set(lh.__all__) <= set(dir(lh))


def test_importing_the_package_does_not_import_pytorch():
    code = ("import sys, latentharmonize, latentharmonize.slicer_bridge; "
            "print(sorted(m for m in ('torch', 'pandas', 'sklearn', 'latentharmonize.pipeline') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("error, builtin", [
    (errors.InputError, ValueError), (errors.NoLungFoundError, ValueError), (errors.BundleError, ValueError),
    (errors.OutputError, OSError), (errors.ResourceError, OSError)])
def test_each_error_is_an_instance_of_its_builtin(error, builtin):
    exc = error("what was wrong, and what to do")
    assert isinstance(exc, builtin) and isinstance(exc, errors.LatentHarmonizeError)
    assert str(exc) == "what was wrong, and what to do" and exc.exit_code == 2
    assert errors.as_user_error(exc) is exc


def test_a_refused_output_folder_keeps_its_message(tmp_path):
    """OutputError is an OSError now: the stage must not rewrap its own refusal as a failed operation."""
    from latentharmonize.atomic import StagedOutput

    (tmp_path / "a.txt").write_text("earlier")
    with pytest.raises(errors.OutputError, match="already holds results"):
        StagedOutput(tmp_path, ["a.txt"])


def _module_imports(path: Path) -> list:
    """(line, dotted module) of every relative import of a backend file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = list(path.relative_to(PACKAGE).with_suffix("").parts)[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - node.level + 1]
            names = [node.module] if node.module else [a.name for a in node.names]
            found += [(node.lineno, ".".join(base + n.split("."))) for n in names]
    return found


def _files(names) -> list:
    paths = []
    for name in names:
        path = PACKAGE / name
        paths += sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    return paths


def test_product_path_imports_no_research_code():
    for path in _files(PRODUCT):
        for line, module in _module_imports(path):
            assert module.split(".")[0] not in RESEARCH, f"{path.name}:{line} imports {module}"


def test_the_product_path_and_its_runners_import_the_package_at_the_top_only():
    for path in _files(PRODUCT + ("batch", "bench", "cohort")):
        top = {n.lineno for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.ImportFrom)}
        for line, module in _module_imports(path):
            assert line in top, f"{path.name}:{line}: import of {module} inside a function"


def test_the_backend_has_no_import_cycle():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = {module for _, module in _module_imports(path)}
    graph = {name: {m for m in modules if m in graph and m != name} for name, modules in graph.items()}
    state = {}

    def visit(name, trail):
        state[name] = "open"
        for module in sorted(graph[name]):
            assert state.get(module) != "open", " -> ".join(trail + [name, module])
            if module not in state:
                visit(module, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_function_of_the_product_path_is_over_60_lines():
    for path in _files(PRODUCT):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}: {node.name} has {length} lines"


def test_analyze_image_gives_what_analyze_writes(scan, bundle_dir, tmp_path):  # noqa: F811
    ct = sitk.ReadImage(str(scan))
    result = lh.analyze_image(ct, bundle_dir, device="cpu")
    assert isinstance(result, lh.ImageAnalysis) and isinstance(result.composition, pd.DataFrame)
    written = lh.analyze(scan, tmp_path / "out", model=bundle_dir, device="cpu", write_report=False)
    labels = sitk.ReadImage(str(written.files["labels"]))
    assert np.array_equal(sitk.GetArrayFromImage(result.labels), sitk.GetArrayFromImage(labels))
    pd.testing.assert_frame_equal(result.composition, written.composition)
    assert result.composition_json == written.files["composition_json"].read_text(encoding="utf-8")
    assert result.warnings == written.record["warnings"] and result.record["input"] is None
    # a lung mask given in memory is taken as --mask takes a file
    again = lh.analyze_image(ct, lh.load_bundle(bundle_dir), lungs=result.lungs, device="cpu")
    assert again.record["mask"] == "given"
    assert np.array_equal(sitk.GetArrayFromImage(again.lungs), sitk.GetArrayFromImage(result.lungs))


def test_analyze_image_takes_images_only(bundle_dir):  # noqa: F811
    with pytest.raises(TypeError, match="GetImageFromArray"):
        lh.analyze_image(np.zeros((4, 4, 4)), bundle_dir)
