"""Static checks of the 3D Slicer module, which cannot run here (Slicer is not installable on the build machines).

(a) every Slicer/MRML/VTK call of LatentHarmonize.py exists in the reference API list (Testing/data/slicer_api.json),
    with a small, cited supplement and an explicit Qt/ctk allowlist; (b) widgets and parameter names agree with the
    .ui file; (c) CMakeLists.txt ships every file the module needs; (d) the module compiles for Python 3.9 and, in
    plain Python, fails only on ``import slicer``.
"""
from __future__ import annotations

import ast
import builtins
import importlib.util
import io
import json
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_slicer_bridge import IJK_TO_RAS, outputs  # noqa: F401  (the fixture is reused for QC and export)

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "LatentHarmonize"
MODULE_FILE = MODULE_DIR / "LatentHarmonize.py"
BRIDGE_FILES = sorted((MODULE_DIR / "latentharmonize" / "slicer_bridge").glob("*.py"))
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LatentHarmonize.ui"
API = json.loads((ROOT / "Testing" / "data" / "slicer_api.json").read_text())

# Slicer classes the reference list does not cover, limited to what the module uses. Each entry was read in the
# Slicer source at the reference commit (file named in "source"); "base" completes the inheritance chains.
SUPPLEMENT = {
    "vtkMRMLTransformableNode": {
        "base": "vtkMRMLStorableNode", "source": "Libs/MRML/Core/vtkMRMLTransformableNode.h",
        "methods": {"GetParentTransformNode": "() -> vtkMRMLTransformNode*", "GetTransformNodeID": "() -> const char*",
                    "SetAndObserveTransformNodeID": "(const char* transformNodeID) -> bool"}},
    "vtkMRMLStorableNode": {"base": "vtkMRMLNode", "source": "Libs/MRML/Core/vtkMRMLStorableNode.h"},
    "vtkMRMLDisplayNode": {"base": "vtkMRMLNode", "source": "Libs/MRML/Core/vtkMRMLDisplayNode.h"},
    "vtkSlicerModuleLogic": {"source": "Base/Logic/vtkSlicerModuleLogic.h"},
    "vtkMRMLSubjectHierarchyNode": {
        "base": "vtkMRMLNode", "source": "Libs/MRML/Core/vtkMRMLSubjectHierarchyNode.h",
        "methods": {"GetSubjectHierarchyNode": "static (vtkMRMLScene* scene) -> vtkMRMLSubjectHierarchyNode*",
                    "GetItemByDataNode": "(vtkMRMLNode* dataNode) -> vtkIdType",
                    "GetItemParent": "(vtkIdType itemID) -> vtkIdType",
                    "SetItemParent": "(vtkIdType itemID, vtkIdType parentItemID, bool enableCircularCheck=true)"}},
    "vtkMRMLSliceNode": {
        "base": "vtkMRMLNode", "source": "Libs/MRML/Core/vtkMRMLSliceNode.h",
        "methods": {"JumpAllSlices": "static (vtkMRMLScene* scene, double r, double a, double s, int jumpMode, "
                                     "int viewGroup=-1, vtkMRMLSliceNode* exclude=nullptr)"},
        "enums": ["DefaultJumpSlice", "CenteredJumpSlice", "OffsetJumpSlice"]},
    "vtkSlicerApplicationLogic": {
        "source": "Base/Logic/vtkSlicerApplicationLogic.h (also listed in slicer.app_selected)",
        "methods": {"GetSelectionNode": "() -> vtkMRMLSelectionNode*", "PropagateTableSelection": "()"}},
    "vtkMRMLSelectionNode": {"base": "vtkMRMLNode", "source": "Libs/MRML/Core/vtkMRMLSelectionNode.h",
                             "methods": {"SetActiveTableID": "(const char* id)"}},
    "vtkSlicerTablesLogic": {"source": "Modules/Loadable/Tables/Logic/vtkSlicerTablesLogic.h",
                             "methods": {"GetLayoutWithTable": "static (int currentLayout) -> int"}},
    # VTK core classes (module ``vtk``), methods of vtkAbstractArray / vtkStringArray / vtkDoubleArray
    "vtkMatrix4x4": {"source": "VTK Common/Core/vtkMatrix4x4.h"},
    "vtkStringArray": {"source": "VTK Common/Core/vtkStringArray.h",
                       "methods": {"SetName": "(const char*)", "InsertNextValue": "(vtkStdString) -> vtkIdType"}},
    "vtkDoubleArray": {"source": "VTK Common/Core/vtkDoubleArray.h",
                       "methods": {"SetName": "(const char*)", "InsertNextValue": "(double) -> vtkIdType"}},
    "vtkCommand": {"source": "VTK Common/Core/vtkCommand.h", "enums": ["ModifiedEvent"]},
}
VTK_CLASSES = {"vtkMatrix4x4", "vtkStringArray", "vtkDoubleArray", "vtkCommand"}
# Scripted/loadable modules reached through slicer.modules.<name> and the object their logic() returns
SLICER_MODULES = {"segmentations": "vtkSlicerSegmentationsModuleLogic", "tables": "vtkSlicerTablesLogic",
                  "segmenteditor": None}
# The PyTorch extension's PyTorchUtils (fepegar/SlicerPyTorch, PyTorchUtils/PyTorchUtils.py), as documented in
# slicer-conventions.md section 3.1
PYTORCHUTILS_METHODS = {"torchInstalled", "installTorch", "getDevice", "torch"}
# Qt/ctk/qMRML widget methods (PythonQt, lowerCamelCase): not in the reference list, allowed by name. Each is a
# documented slot/method of the widget it is called on in LatentHarmonize.py:
QT_METHODS = {
    "connect",                      # QObject signal connection (PythonQt)
    "addWidget",                    # QLayout (self.layout)
    "setMRMLScene",                 # qMRMLWidget
    "setValue", "setFormat",        # QProgressBar
    "appendPlainText",              # QPlainTextEdit (log)
    "setInterval", "start", "stop",  # QTimer
    "setCurrentNode", "currentNode", "setCurrentSegmentID", "currentSegmentID",  # qMRMLSegmentSelectorWidget
    "setSegmentationNode", "selectedSegmentIDs",  # qMRMLSegmentsTableView, qMRMLSegmentEditorWidget
    "setSourceVolumeNode",          # qMRMLSegmentEditorWidget (Slicer >= 5.4)
    "setMRMLTableNode",             # qMRMLTableView slot (Libs/MRML/Widgets/qMRMLTableView.h)
    "widgetRepresentation", "self",  # qSlicerAbstractCoreModule widget; PythonQt self() of a scripted widget
    "layoutManager", "setLayout",   # qSlicerApplication / qSlicerLayoutManager
}
QT_NAMES = {"QTimer", "QDesktopServices", "QUrl"}
# static Qt methods called on those classes (Qt 5 documentation): QDesktopServices::openUrl, QUrl::fromLocalFile
QT_CLASS_METHODS = {"QDesktopServices": {"openUrl"}, "QUrl": {"fromLocalFile"}}
# Slicer's Screen Capture module (Modules/Scripted/ScreenCapture/ScreenCapture.py, ScreenCaptureLogic): with view None
# captureImageFromView grabs the whole view layout
SCREENCAPTURE_METHODS = {"captureImageFromView": "(self, view, filename, transparentBackground=False)"}
# Python and numpy methods on plain values (lists, dicts, strings, paths, queues, threads, processes and their pipes,
# arrays)
PYTHON_METHODS = set().union(*(dir(t) for t in (str, list, dict, set, tuple, pathlib.Path, queue.Queue,
                                                 threading.Thread, subprocess.Popen, io.TextIOWrapper, np.ndarray)))
STDLIB_MODULES = set(sys.stdlib_module_names)


# ------------------------------------------------------------------------------------------- the API model

def _class_table() -> dict:
    classes = {}
    for name, spec in API["cpp_classes"].items():
        classes[name] = {"base": spec.get("base"), "methods": dict(spec.get("methods", {})),
                         "enums": {v for values in spec.get("enums", {}).values() for v in values}}
    for name, spec in SUPPLEMENT.items():
        entry = classes.setdefault(name, {"base": spec.get("base"), "methods": {}, "enums": set()})
        entry["methods"].update(spec.get("methods", {}))
        entry["enums"] |= set(spec.get("enums", []))
    return classes


CLASSES = _class_table()


def _chain(cls: str):
    while cls in CLASSES:
        yield CLASSES[cls]
        cls = CLASSES[cls]["base"]


def _method(cls: str, name: str):
    return next((c["methods"][name] for c in _chain(cls) if name in c["methods"]), None)


def _has_member(cls: str, name: str) -> bool:
    return any(name in c["methods"] or name in c["enums"] for c in _chain(cls))


def _returned_class(signature) -> str | None:
    for sig in signature if isinstance(signature, list) else [signature]:
        m = re.search(r"->\s*(?:const\s+)?(\w+)\s*\*", sig)
        if m and m.group(1) in CLASSES:
            return m.group(1)
    return None


def _python_params(signature: str):
    """Parameter names of a Python signature string; None if it takes **kwargs (anything goes)."""
    sig = re.sub(r"^@\w+\s*", "", signature.strip())
    fn = ast.parse(f"def f{sig}: pass").body[0]
    if fn.args.kwarg is not None:
        return None
    args = fn.args
    return [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]


UTIL = {**API["slicer.util"]["functions"], **{k: v["methods"].get("__init__", "(*args)")
                                             for k, v in API["slicer.util"]["classes"].items()}}
PACKAGING = API["slicer.packaging"]["functions"]
APP_MEMBERS = {n for member in API["slicer.app_selected"]["members"] for n in re.findall(r"(?:^|/)(\w+)", member)}
SLM_CLASSES = API["slicer.ScriptedLoadableModule"]["classes"]
PNW_EXPORTS = {n for names in API["slicer.parameterNodeWrapper"]["exports_by_submodule"].values() for n in names}
PNW_INSTANCE = {re.match(r"\w+", s).group(0) for s in API["slicer.parameterNodeWrapper"]["wrapped_instance_api"]}
SEGSTATS = API["SegmentStatistics"]["SegmentStatisticsLogic"]
SAMPLEDATA = API["SampleData"]["module_functions"]
UTIL_RETURNS = {"loadSegmentation": "vtkMRMLSegmentationNode", "loadVolume": "vtkMRMLScalarVolumeNode",
                "addVolumeFromArray": "vtkMRMLScalarVolumeNode", "downloadSample": "vtkMRMLScalarVolumeNode"}
BASE_METHODS = {  # methods inherited from Slicer's Python base classes and the Python ones they build on
    "ScriptedLoadableModule": set(SLM_CLASSES["ScriptedLoadableModule"]["methods"]),
    "ScriptedLoadableModuleWidget": set(SLM_CLASSES["ScriptedLoadableModuleWidget"]["methods"]),
    "ScriptedLoadableModuleLogic": set(SLM_CLASSES["ScriptedLoadableModuleLogic"]["methods"]),
    "ScriptedLoadableModuleTest": set(SLM_CLASSES["ScriptedLoadableModuleTest"]["methods"])
                                  | {m for m in dir(__import__("unittest").TestCase) if not m.startswith("__")},
    "VTKObservationMixin": set(API["slicer.util"]["classes"]["VTKObservationMixin"]["methods"]),
}


def _bridge_names() -> tuple:
    tree = ast.Module(body=[n for f in BRIDGE_FILES for n in ast.parse(f.read_text()).body], type_ignores=[])
    functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    members = {m.name for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body
               if isinstance(m, ast.FunctionDef)}
    members |= {t.target.id for c in tree.body if isinstance(c, ast.ClassDef) for t in c.body
                if isinstance(t, ast.AnnAssign) and isinstance(t.target, ast.Name)}
    members |= {a.attr for a in ast.walk(tree) if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name)
                and a.value.id == "self"}
    return functions, members


BRIDGE_FUNCTIONS, BRIDGE_MEMBERS = _bridge_names()


# ------------------------------------------------------------------------------------------- the checker

class SlicerApiChecker:
    """Resolves each attribute call of a module to a receiver type and checks it against the API model.

    Types: ``cls:X`` (instance of a C++/VTK class), ``classobj:X`` (the class itself), ``mod:C`` (instance of a class
    of the checked file), ``ns:...`` (a namespace such as slicer.util), ``pn`` (parameter node wrapper), ``py:X``
    (a documented Python class of another module). Variables get types from annotations (string annotations with a
    class name are the way to type a local, e.g. ``display: "vtkMRMLSegmentationDisplayNode" = ...``), from node
    factories (``AddNewNodeByClass("vtkMRMLTableNode")``) and from return types in the API list. Calls of
    UpperCamelCase (VTK/MRML) methods on receivers of unknown type are errors, so a misspelt MRML method cannot hide
    behind an untyped variable.
    """

    def __init__(self, source: str):
        self.tree = ast.parse(source)
        self.errors: list = []
        self.resolved: set = set()  # (class or namespace, method) of every call checked against the API list
        self.imports: dict = {}
        self.module_classes = {c.name: c for c in self.tree.body if isinstance(c, ast.ClassDef)}
        self.class_attrs: dict = {name: {} for name in self.module_classes}
        self.parameter_fields: dict = {}
        self._collect_imports()
        self._collect_parameter_node()

    # --- collection

    def _collect_imports(self) -> None:
        for node in self.tree.body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = f"ns:{alias.name}"
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    self._check_import(node.module, alias.name, node.lineno)
                    local = alias.asname or alias.name
                    if node.module == "slicer" and alias.name in CLASSES:
                        self.imports[local] = f"classobj:{alias.name}"
                    else:
                        self.imports[local] = f"ns:{node.module}.{alias.name}"

    def _check_import(self, module: str, name: str, line: int) -> None:
        known = {"slicer": set(CLASSES), "slicer.util": set(UTIL), "slicer.ScriptedLoadableModule": set(SLM_CLASSES),
                 "slicer.parameterNodeWrapper": PNW_EXPORTS, "slicer.i18n": set(API["slicer.i18n"]["functions"])}
        if module in known and name not in known[module]:
            self.errors.append(f"line {line}: 'from {module} import {name}': {name} is not in the API list")

    def _collect_parameter_node(self) -> None:
        for cls in self.module_classes.values():
            if any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in cls.decorator_list):
                for stmt in cls.body:
                    if isinstance(stmt, ast.AnnAssign):
                        self.parameter_fields[stmt.target.id] = stmt.annotation

    # --- types

    def annotation_type(self, ann) -> str | None:
        if ann is None:
            return None
        name = ann.value if isinstance(ann, ast.Constant) and isinstance(ann.value, str) else (
            ann.id if isinstance(ann, ast.Name) else ann.attr if isinstance(ann, ast.Attribute) else None)
        if name in CLASSES:
            return f"cls:{name}"
        if name in self.module_classes:
            return "pn" if self._is_parameter_node(name) else f"mod:{name}"
        return None

    def _is_parameter_node(self, cls: str) -> bool:
        return any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper"
                   for d in self.module_classes[cls].decorator_list)

    def typeof(self, expr, env: dict, cls: str | None):
        if isinstance(expr, ast.Name):
            if expr.id in env:
                return env[expr.id]
            if expr.id in self.module_classes:
                return f"classdef:{expr.id}"
            return self.imports.get(expr.id)
        if isinstance(expr, ast.Attribute):
            return self._attribute_type(self.typeof(expr.value, env, cls), expr.attr, expr, env, cls)
        if isinstance(expr, ast.Call):
            return self._call_type(expr, env, cls)
        return None

    def _attribute_type(self, base, attr: str, expr, env, cls):
        if base == "ns:slicer":
            if attr in ("util", "packaging", "modules", "app"):
                return f"ns:slicer.{attr}"
            if attr == "mrmlScene":
                return "cls:vtkMRMLScene"
            return f"classobj:{attr}" if attr in CLASSES else None
        if base == "ns:slicer.modules":
            return f"slicermodule:{attr}"
        if base == "ns:vtk" and attr in VTK_CLASSES:
            return f"classobj:{attr}"
        if base == "ns:qt" and attr in QT_NAMES:
            return f"qtclass:{attr}"
        if base == "ns:SampleData" and attr == "SampleDataLogic":
            return "py:SampleDataLogic"
        if base == "self" and cls:
            return self.class_attrs[cls].get(attr)
        if base and base.startswith("mod:"):
            return self.class_attrs[base[4:]].get(attr)
        if base and base.startswith("ns:") and base[3:].split(".")[0] in STDLIB_MODULES:
            return f"{base}.{attr}"
        if base == "pn":
            return self.annotation_type(self.parameter_fields.get(attr))
        return None

    def _call_type(self, call, env, cls):
        func = call.func
        if isinstance(func, ast.Name):
            if func.id == "super":
                return f"super:{cls}"
            if func.id in ("bridge", "bridgeTables"):
                return "ns:bridge"
            if func.id in self.module_classes:
                return "pn" if self._is_parameter_node(func.id) else f"mod:{func.id}"
            return None
        if not isinstance(func, ast.Attribute):
            return None
        base, m = self.typeof(func.value, env, cls), func.attr
        if base is None:
            return None
        kind, _, name = base.partition(":")
        if kind in ("cls", "classobj"):
            if name == "vtkMRMLScene" and m in ("AddNewNodeByClass", "GetFirstNodeByClass", "CreateNodeByClass") \
                    and call.args and isinstance(call.args[0], ast.Constant) and call.args[0].value in CLASSES:
                return f"cls:{call.args[0].value}"
            signature = _method(name, m)
            returned = _returned_class(signature) if signature else None
            return f"cls:{returned}" if returned else None
        if base == "ns:vtk" and m in VTK_CLASSES:
            return f"cls:{m}"
        if base == "ns:slicer.util":
            return f"cls:{UTIL_RETURNS[m]}" if m in UTIL_RETURNS else None
        if kind == "slicermodule" and m == "logic" and SLICER_MODULES.get(name):
            return f"cls:{SLICER_MODULES[name]}"
        if base == "ns:slicer.app" and m == "applicationLogic":
            return "cls:vtkSlicerApplicationLogic"
        if base == "ns:SegmentStatistics" and m == "SegmentStatisticsLogic":
            return "py:SegmentStatisticsLogic"
        if base == "py:SegmentStatisticsLogic" and m == "getParameterNode":
            return "cls:vtkMRMLScriptedModuleNode"
        if base == "ns:ScreenCapture" and m == "ScreenCaptureLogic":
            return "py:ScreenCaptureLogic"
        if base == "ns:importlib" and m == "import_module" and call.args and isinstance(call.args[0], ast.Constant) \
                and call.args[0].value in ("slicer.packaging",):
            return f"ns:{call.args[0].value}"
        if base == "self" and cls:
            method = self._module_method(cls, m)
            return self.annotation_type(method.returns) if method is not None else None
        if base == "ns:PyTorchUtils" and m == "PyTorchUtilsLogic":
            return "py:PyTorchUtilsLogic"
        if base == "ns:SampleData" and m in UTIL_RETURNS:
            return f"cls:{UTIL_RETURNS[m]}"
        if kind == "mod":
            method = self._module_method(name, m)
            return self.annotation_type(method.returns) if method is not None else None
        if kind == "super" and m == "getParameterNode":
            return "cls:vtkMRMLScriptedModuleNode"
        return None

    def _module_method(self, cls: str, name: str):
        node = self.module_classes.get(cls)
        if node is None:
            return None
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef) and stmt.name == name:
                return stmt
        return None

    def _module_members(self, cls: str) -> set:
        node = self.module_classes[cls]
        members = {s.name for s in node.body if isinstance(s, ast.FunctionDef)}
        members |= set(self.class_attrs[cls])
        for base in node.bases:
            base_name = base.id if isinstance(base, ast.Name) else None
            if base_name in self.module_classes:
                members |= self._module_members(base_name)
            members |= BASE_METHODS.get(base_name, set())
        return members

    # --- environments

    def function_env(self, fn, cls: str | None) -> dict:
        env = {}
        args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        for i, arg in enumerate(args):
            if i == 0 and cls and arg.arg == "self" and not any(
                    isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list):
                env["self"] = "self"
            elif arg.annotation is not None:
                env[arg.arg] = self.annotation_type(arg.annotation)
        for node in ast.walk(fn):  # imports inside the function (SegmentStatistics, PyTorchUtils, SampleData...)
            if isinstance(node, ast.Import):
                env.update({a.asname or a.name: f"ns:{a.name}" for a in node.names})
        assignments = sorted((n for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AnnAssign))),
                             key=lambda n: (n.lineno, n.col_offset))
        for node in assignments:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                env[node.target.id] = self.annotation_type(node.annotation)
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                env.setdefault(node.targets[0].id, self.typeof(node.value, env, cls))
        return env

    def _collect_class_attrs(self) -> None:
        for _ in range(2):  # attribute types may depend on other attributes: settle in two passes
            for cls, node in self.module_classes.items():
                for fn in (s for s in node.body if isinstance(s, ast.FunctionDef)):
                    env = self.function_env(fn, cls)
                    for assign in ast.walk(fn):
                        targets = assign.targets if isinstance(assign, ast.Assign) else (
                            [assign.target] if isinstance(assign, ast.AnnAssign) else [])
                        for target in targets:
                            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                                    and target.value.id == "self":
                                value = self.annotation_type(assign.annotation) if isinstance(assign, ast.AnnAssign) \
                                    else self.typeof(assign.value, env, cls)
                                if value or target.attr not in self.class_attrs[cls]:
                                    self.class_attrs[cls][target.attr] = value

    # --- checks

    def check(self) -> list:
        self._collect_class_attrs()
        for cls, node in self.module_classes.items():
            for fn in (s for s in node.body if isinstance(s, ast.FunctionDef)):
                self._check_function(fn, cls)
        for fn in (s for s in self.tree.body if isinstance(s, ast.FunctionDef)):
            self._check_function(fn, None)
        return self.errors

    def _check_function(self, fn, cls) -> None:
        env = self.function_env(fn, cls)
        calls = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                calls.add(id(node.func))
                self._check_call(node, env, cls)
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and id(node) not in calls and node.attr[:1].isupper():
                base = self.typeof(node.value, env, cls)
                if base and base.split(":")[0] in ("cls", "classobj") and not _has_member(base.split(":")[1], node.attr):
                    self.errors.append(f"line {node.lineno}: {base.split(':')[1]} has no member {node.attr}")

    def _check_call(self, call, env, cls) -> None:
        m, line = call.func.attr, call.lineno
        base = self.typeof(call.func.value, env, cls)
        kind, _, name = (base or "").partition(":")
        error = None
        if kind in ("cls", "classobj") or base in ("ns:slicer.util", "ns:slicer.packaging", "py:SegmentStatisticsLogic",
                                                   "py:SampleDataLogic", "py:ScreenCaptureLogic"):
            self.resolved.add((name or base, m))
        if base is None:
            if m[:1].isupper():
                error = f"{m}() is called on a receiver of unknown type: annotate it with its MRML/VTK class"
            elif m not in QT_METHODS | PYTHON_METHODS | BRIDGE_MEMBERS:
                error = f"{m}() is neither a known Slicer call nor in the Qt/ctk allowlist"
        elif base.startswith("ns:") and base[3:].split(".")[0] in STDLIB_MODULES:
            return
        elif base in SIGNATURE_TABLES:
            table = SIGNATURE_TABLES[base]
            if m not in table:
                error = f"{base[3:]}.{m} is not in the API list"
            else:
                params = _python_params(table[m])
                bad = [k.arg for k in call.keywords if k.arg and params is not None and k.arg not in params]
                if bad:
                    error = f"{base[3:]}.{m} has no parameter {', '.join(bad)}"
        elif base == "ns:slicer.app":
            if m not in APP_MEMBERS:
                error = f"slicer.app.{m} is not in the API list"
        elif base == "ns:slicer":
            error = f"slicer.{m}() is not a known class or function"
        elif kind in ("cls", "classobj"):
            if not _has_member(name, m):
                error = f"{name} has no method {m}"
        elif kind == "slicermodule":
            if name not in SLICER_MODULES:
                error = f"slicer.modules.{name} is not a module this extension relies on"
            elif m not in ("logic", "widgetRepresentation"):
                error = f"slicer.modules.{name}.{m}() is not a module method"
        elif kind == "mod":
            if m not in self._module_members(name):
                error = f"{name} has no method {m}"
        elif kind == "super":
            bases = [b.id for b in self.module_classes[name].bases if isinstance(b, ast.Name)]
            if not any(m in BASE_METHODS.get(b, set()) for b in bases):
                error = f"no base class of {name} has {m}"
        elif base == "self":
            if m not in self._module_members(cls):
                error = f"{cls} has no method {m}"
        elif base in KNOWN_MEMBERS:
            allowed, message = KNOWN_MEMBERS[base]
            if m not in allowed:
                error = message.format(m=m)
        elif kind == "qtclass":
            if m not in QT_CLASS_METHODS.get(name, set()):
                error = f"{name}.{m}() is not in the Qt allowlist"
        if error:
            self.errors.append(f"line {line}: {error}")


# receivers whose members are checked with their signatures (names and keyword arguments)
SIGNATURE_TABLES = {"ns:slicer.util": UTIL, "ns:slicer.packaging": PACKAGING,
                    "py:SampleDataLogic": API["SampleData"]["SampleDataLogic"],
                    "py:ScreenCaptureLogic": SCREENCAPTURE_METHODS}
# receivers whose callable members are a fixed list: base -> (allowed names, error message)
KNOWN_MEMBERS = {
    "pn": (PNW_INSTANCE, "parameter node wrapper has no method {m}"),
    "py:SegmentStatisticsLogic": (SEGSTATS, "SegmentStatisticsLogic has no method {m}"),
    "py:PyTorchUtilsLogic": (PYTORCHUTILS_METHODS, "PyTorchUtilsLogic has no method {m}"),
    "ns:SampleData": (SAMPLEDATA, "SampleData.{m} is not in the API list"),
    "ns:SegmentStatistics": ({"SegmentStatisticsLogic"}, "SegmentStatistics.{m} is not used by the reference API"),
    "ns:PyTorchUtils": ({"PyTorchUtilsLogic"}, "PyTorchUtils.{m} is not documented"),
    "ns:ScreenCapture": ({"ScreenCaptureLogic"}, "ScreenCapture.{m} is not used by the reference API"),
    "ns:bridge": (BRIDGE_FUNCTIONS, "slicer_bridge has no function {m}"),
    "ns:vtk": (VTK_CLASSES, "vtk.{m} is not in the allowlist"),
    "ns:qt": (QT_NAMES, "qt.{m} is not in the Qt allowlist"),
}


def check_source(source: str) -> list:
    return SlicerApiChecker(source).check()


@pytest.fixture(scope="module")
def module_source() -> str:
    return MODULE_FILE.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------- (a) API calls

def test_every_slicer_call_of_the_module_is_in_the_api_list(module_source):
    checker = SlicerApiChecker(module_source)
    assert checker.check() == []
    # the calls that matter were resolved to their classes, not skipped as unknown
    assert {("vtkSlicerSegmentationsModuleLogic", "SetSegmentStatus"),
            ("vtkMRMLSegmentationDisplayNode", "SetOpacity2DFill"),
            ("vtkMRMLTableNode", "AddColumn"), ("vtkMRMLSubjectHierarchyNode", "SetItemParent"),
            ("vtkMRMLSliceNode", "JumpAllSlices"), ("vtkSegment", "SetColor"), ("vtkMRMLScene", "AddNewNodeByClass"),
            ("vtkMRMLSegmentationNode", "SetReferenceImageGeometryParameterFromVolumeNode"),
            ("vtkSlicerTablesLogic", "GetLayoutWithTable"), ("vtkMRMLScriptedModuleNode", "SetParameter"),
            ("slicer.util", "startupEnvironment"), ("slicer.util", "arrayFromSegmentBinaryLabelmap"),
            ("slicer.packaging", "pip_ensure"), ("SegmentStatisticsLogic", "exportToCSVFile")} <= checker.resolved
    # the calls added for issue 22 are checked too, not skipped
    assert {("SampleDataLogic", "registerCustomSampleDataSource"), ("ScreenCaptureLogic", "captureImageFromView"),
            ("vtkMRMLTransformableNode", "GetParentTransformNode"),
            ("vtkMRMLTransformableNode", "SetAndObserveTransformNodeID"), ("vtkMRMLScene", "IsNodePresent"),
            ("vtkMRMLScene", "RemoveNode"), ("SegmentStatisticsLogic", "setParameterNode"),
            ("slicer.util", "updateVolumeFromArray"), ("slicer.util", "loadVolume"),
            ("vtkMRMLSegmentationNode", "GetNodeReference"), ("vtkMRMLLabelMapVolumeNode", "SetIJKToRASMatrix"),
            ("vtkMRMLSegmentationNode", "GetReferenceImageGeometryReferenceRole")} <= checker.resolved
    assert len(checker.resolved) > 60


GOOD_SNIPPET = '''
import importlib
import qt
import SampleData
import ScreenCapture
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

class Logic(ScriptedLoadableModuleLogic):
    def show(self, volume: "vtkMRMLScalarVolumeNode"):
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "clusters")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        volume.GetIJKToRASMatrix(vtk.vtkMatrix4x4())
        display: "vtkMRMLSegmentationDisplayNode" = segmentation.GetDisplayNode()
        display.SetOpacity2DFill(0.5)
        segment = segmentation.GetSegmentation().GetSegment("Segment_1")
        slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(segment, slicer.vtkSlicerSegmentationsModuleLogic.Flagged)
        slicer.util.launchConsoleProcess(["x"], blocking=False, completedCallback=print)
        column = vtk.vtkStringArray()
        column.SetName("Region")
        packaging = importlib.import_module("slicer.packaging")
        packaging.pip_ensure(["scipy"], skip_packages=["torch"], prompt_install=False)
        SampleData.SampleDataLogic.registerCustomSampleDataSource(sampleName="x", loadFileType="VolumeFile")
        ScreenCapture.ScreenCaptureLogic().captureImageFromView(None, "x.png")
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile("x.html"))
        return self.getParameterNode()
'''


@pytest.mark.parametrize("mistake, message", [
    ("display.SetOpacity2DFill(0.5)", "display.SetOpacty2DFill(0.5)"),
    ("segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)",
     "segmentation.SetReferenceGeometryFromVolume(volume)"),
    ('segment = segmentation.GetSegmentation().GetSegment("Segment_1")',
     'segment = segmentation.GetSegmentation().GetSegmnt("Segment_1")'),
    ("slicer.vtkSlicerSegmentationsModuleLogic.Flagged)", "slicer.vtkSlicerSegmentationsModuleLogic.Flaged)"),
    ("blocking=False, completedCallback=print", "blocking=False, onDone=print"),
    ('slicer.util.launchConsoleProcess(["x"]', 'slicer.util.launchProcess(["x"]'),
    ('column.SetName("Region")', 'column.SetTitle("Region")'),
    ("return self.getParameterNode()", "return self.getParameterNod()"),
    ("skip_packages=[\"torch\"]", "skip_package=[\"torch\"]"),
    ("packaging.pip_ensure(", "packaging.pip_insure("),
    ("registerCustomSampleDataSource(sampleName", "registerCustomSampleDataSource(sample_name"),
    ("captureImageFromView(None", "captureImage(None"),
    ("qt.QUrl.fromLocalFile(", "qt.QUrl.fromFile("),
    ('display: "vtkMRMLSegmentationDisplayNode" = segmentation.GetDisplayNode()',
     "display = segmentation.GetDisplayNode()"),  # untyped display node: its MRML calls cannot be checked
    ("def show(self, volume: \"vtkMRMLScalarVolumeNode\"):", "def show(self, volume):"),
])
def test_checker_catches_misspelt_or_unverifiable_calls(mistake, message):
    assert check_source(GOOD_SNIPPET) == []
    broken = GOOD_SNIPPET.replace(mistake, message)
    assert broken != GOOD_SNIPPET
    assert check_source(broken), f"the checker accepted: {message}"


def test_supplement_only_adds_what_the_reference_lacks():
    """The cited supplement must not shadow or contradict the reference list."""
    for name, spec in SUPPLEMENT.items():
        reference = API["cpp_classes"].get(name, {}).get("methods", {})
        assert not set(spec.get("methods", {})) & set(reference), f"{name}: supplement repeats reference methods"
        assert spec.get("source"), f"{name}: cite where the method was checked"


# ------------------------------------------------------------------------------------------- (b) UI and parameters

def _ui_widgets() -> tuple:
    root = ET.parse(UI_FILE).getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    bound = {}
    for w in root.iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[w.get("name")] = prop.find("string").text
    return root, widgets, bound


def _ui_uses(source: str) -> set:
    return {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "ui"
            and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}


def test_every_widget_the_code_uses_exists_in_the_ui(module_source):
    root, widgets, _ = _ui_widgets()
    assert root.find("widget").get("class") == "qMRMLWidget"
    used = _ui_uses(module_source)
    assert "applyButton" in used and "progressBar" in used and "statusLabel" in used
    assert used - set(widgets) == set()


def test_parameter_names_match_fields_and_widget_types(module_source):
    _, widgets, bound = _ui_widgets()
    fields = SlicerApiChecker(module_source).parameter_fields
    assert set(bound.values()) <= set(fields), "a SlicerParameterName has no parameter-node field"
    assert len(set(bound.values())) == len(bound), "two widgets bound to one parameter"
    # which annotation each widget class can represent (guiConnectors.py, listed in the reference API)
    accepts = {"qMRMLNodeComboBox": lambda a: a.startswith("vtkMRML"), "QComboBox": lambda a: a in ("str", "Choice"),
               "ctkPathLineEdit": lambda a: a == "pathlib.Path", "ctkDirectoryButton": lambda a: a == "pathlib.Path",
               "ctkSliderWidget": lambda a: a in ("float", "int"), "QCheckBox": lambda a: a == "bool"}
    for widget, field in bound.items():
        annotation = ast.unparse(fields[field])
        kind = "Choice" if "Choice" in annotation else annotation.replace("Annotated[", "").split(",")[0].strip("]")
        assert accepts[widgets[widget]](kind), f"{widget} ({widgets[widget]}) cannot show {field}: {annotation}"


def test_node_selectors_list_the_parameter_node_type(module_source):
    root, widgets, bound = _ui_widgets()
    fields = SlicerApiChecker(module_source).parameter_fields
    for w in root.iter("widget"):
        if w.get("class") == "qMRMLNodeComboBox" and w.get("name") in bound:
            types = [s.text for p in w.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
            assert types == [ast.unparse(fields[bound[w.get("name")]])]


def test_every_mrml_widget_gets_the_scene():
    root, widgets, _ = _ui_widgets()
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert receivers == {name for name, cls in widgets.items() if cls.startswith("qMRML") and cls != "qMRMLWidget"}


def test_connected_signals_exist_on_their_widgets(module_source):
    _, widgets, _ = _ui_widgets()
    signals = {"QPushButton": {"clicked(bool)", "toggled(bool)"},
               "qMRMLSegmentSelectorWidget": {"currentNodeChanged(vtkMRMLNode*)", "currentSegmentChanged(QString)"},
               # qMRMLSegmentsTableView.h re-emits its table's selection model signal (onSegmentSelectionChanged)
               "qMRMLSegmentsTableView": {"selectionChanged(QItemSelection,QItemSelection)"}}
    for node in ast.walk(ast.parse(module_source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect":
            owner = node.func.value
            if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Attribute) and owner.value.attr == "ui":
                signal = node.args[0].value
                assert signal in signals[widgets[owner.attr]], f"{owner.attr} has no signal {signal}"


def test_analyze_button_state_is_driven_by_the_bridge(module_source):
    """Apply's enabled state and tooltip come from slicer_bridge.missing_inputs, the Cancel text while running."""
    tree = ast.parse(module_source)
    check = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_checkCanApply")
    text = ast.unparse(check)
    assert "missing_inputs" in text and "applyButton.toolTip" in text and "_('Cancel')" in text


# ------------------------------------------------------------------------------------------- (c) CMake lists

def _cmake_set(text: str, variable: str) -> list:
    m = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    return m.group(1).split() if m else []


def _cmake_globs(text: str) -> dict:
    globs = {}
    for kind, variable, body in re.findall(r"file\((GLOB(?:_RECURSE)?)\s+(\w+)\s+(.*?)\)", text, re.S):
        patterns = [t for t in body.split() if t not in ("RELATIVE", "CONFIGURE_DEPENDS", "${CMAKE_CURRENT_SOURCE_DIR}")]
        globs[variable] = (kind, patterns)
    return globs


def _expand(entries: list, text: str) -> set:
    globs = _cmake_globs(text)
    files = set()
    for entry in entries:
        entry = entry.replace("${MODULE_NAME}", "LatentHarmonize")
        m = re.fullmatch(r"\$\{(\w+)\}", entry)
        if m:
            kind, patterns = globs[m.group(1)]
            for pattern in patterns:
                # CMake's GLOB_RECURSE matches dir/*.py in dir and all its subdirectories (subpackages)
                folder, _, name = pattern.rpartition("/")
                found = (MODULE_DIR / folder).rglob(name) if kind == "GLOB_RECURSE" else MODULE_DIR.glob(pattern)
                files |= {p.relative_to(MODULE_DIR).as_posix() for p in found if p.is_file()}
        else:
            files.add(entry)
    return files


def _needed_files() -> set:
    """Files Slicer needs at run time: everything in the module folder but tests, build files and caches."""
    skipped = ("Testing/", "__pycache__/", ".egg-info/")
    return {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*")
            if p.is_file() and p.name != "CMakeLists.txt" and p.suffix != ".pyc"
            and not any(s in p.relative_to(MODULE_DIR).as_posix() + "/" for s in skipped)
            and not any(part.endswith(".egg-info") for part in p.parts)}


def test_cmake_lists_every_file_the_module_needs():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = _expand(_cmake_set(text, "MODULE_PYTHON_SCRIPTS"), text)
    resources = _expand(_cmake_set(text, "MODULE_PYTHON_RESOURCES"), text)
    listed = scripts | resources
    assert {"LatentHarmonize.py", "latentharmonize/__init__.py", "latentharmonize/slicer_bridge/__init__.py",
            "latentharmonize/analyze_command.py", "latentharmonize/pipeline.py", "latentharmonize/__main__.py"} <= scripts
    assert {"Resources/Icons/LatentHarmonize.png", "Resources/UI/LatentHarmonize.ui",
            "Resources/requirements.txt"} <= resources
    missing_on_disk = sorted(f for f in listed if not (MODULE_DIR / f).is_file())
    assert missing_on_disk == [], "listed but absent (CMake configure would fail)"
    assert sorted(_needed_files() - listed) == [], "needed at run time but not installed by CMake"
    assert not {f for f in resources if f.endswith(".py")}, "Python files belong in MODULE_PYTHON_SCRIPTS"
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_model_bundle_glob_covers_the_default_bundle_folder():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    kind, patterns = _cmake_globs(text)["LATENTHARMONIZE_MODEL_FILES"]
    assert patterns == ["Resources/Models/default/*"]
    source = MODULE_FILE.read_text()
    assert 'DEFAULT_MODEL = MODULE_DIR / "Resources" / "Models" / "default"' in source


def test_in_slicer_test_script_is_registered():
    testing = (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text()
    assert "add_subdirectory(Python)" in testing
    python = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text()
    script = re.search(r"slicer_add_python_test\(SCRIPT (\S+)", python).group(1)
    assert (MODULE_DIR / "Testing" / "Python" / script).is_file()


def test_extension_metadata_and_icons():
    text = (ROOT / "CMakeLists.txt").read_text()
    meta = dict(re.findall(r'set\((EXTENSION_\w+)\s+"?([^")]*)"?\)', text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL"):
        assert meta.get(key, "").strip(), f"{key} is empty"
    assert "PyTorch" in meta["EXTENSION_DEPENDS"].split()
    assert re.search(r"add_subdirectory\(LatentHarmonize\)", text)
    assert text.index("find_package(Slicer REQUIRED)") < text.index("add_subdirectory(LatentHarmonize)")
    assert meta["EXTENSION_ICONURL"].endswith("/Resources/LatentHarmonize.png")
    top, module = ROOT / "Resources" / "LatentHarmonize.png", MODULE_DIR / "Resources" / "Icons" / "LatentHarmonize.png"
    assert top.read_bytes() == module.read_bytes()
    icon = sitk.ReadImage(str(top))
    assert icon.GetSize() == (128, 128) and icon.GetNumberOfComponentsPerPixel() == 4
    alpha = sitk.GetArrayFromImage(icon)[..., 3]
    assert 0.2 < (alpha > 0).mean() < 0.9  # a shape on a transparent background


def test_reference_api_copy_is_the_shared_reference():
    shared = Path("/work/shared/reference/slicer_api.json")
    if not shared.exists():
        pytest.skip("shared reference folder not mounted on this machine")
    assert json.loads(shared.read_text()) == API


# ------------------------------------------------------------------------------------------- (d) import and compile

@pytest.mark.parametrize("path", [MODULE_FILE, *BRIDGE_FILES,
                                  MODULE_DIR / "Testing" / "Python" / "LatentHarmonizeBridgeTest.py"])
def test_sources_compile_for_python_3_9(path):
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))
    compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_plain_python_import_fails_only_on_slicer(tmp_path):
    """Outside Slicer the first non-standard import is ``slicer``; nothing before it may fail or do work."""
    probe = ("import json, runpy, sys\n"
             "try:\n"
             f"    runpy.run_path({str(MODULE_FILE)!r}, run_name='LatentHarmonize')\n"
             "except BaseException as exc:\n"
             "    print(json.dumps([type(exc).__name__, getattr(exc, 'name', None)]))\n"
             "else:\n"
             "    print(json.dumps(['no error', None]))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["ModuleNotFoundError", "slicer"]


def test_module_level_imports_are_light(module_source):
    """Heavy or optional packages (torch, monai, pandas, the backend) are imported only where used."""
    tree = ast.parse(module_source)
    top = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            top.append(node.module.split(".")[0])
    first_slicer = top.index("slicer")
    assert all(name in STDLIB_MODULES for name in top[:first_slicer])
    assert set(top[first_slicer:]) <= {"slicer", "qt", "ctk", "vtk"}


def test_dependencies_are_installed_only_on_analyze(module_source):
    """pip and PyTorch installs live in the logic's dependency step, reached from Analyze and the self-test only."""
    tree = ast.parse(module_source)
    installers = {"pip_install", "pip_ensure", "installTorch"}
    owners = {fn.name for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
              for n in ast.walk(fn) if isinstance(n, ast.Attribute) and n.attr in installers}
    assert owners == {"ensureDependencies", "_installPackages"}
    callers = {fn.name for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
               for n in ast.walk(fn) if isinstance(n, ast.Attribute) and n.attr == "ensureDependencies"}
    assert callers == {"onApplyButton", "test_AnalyzeCTChest"}
    assert "SKIP_PACKAGES" in ast.unparse(next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                                               and f.name == "_installPackages"))


def test_module_defines_the_slicer_classes(module_source):
    tree = ast.parse(module_source)
    bases = {c.name: [ast.unparse(b) for b in c.bases] for c in tree.body if isinstance(c, ast.ClassDef)}
    assert bases["LatentHarmonize"] == ["ScriptedLoadableModule"]
    assert bases["LatentHarmonizeWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["LatentHarmonizeLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["LatentHarmonizeTest"] == ["ScriptedLoadableModuleTest"]
    test_class = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "LatentHarmonizeTest")
    assert "downloadSample('CTChest')" in ast.unparse(test_class)
    assert "CTChest" in {s["sampleName"] for s in API["SampleData"]["builtin_samples_General_category"]}


def test_backend_runs_as_a_resident_worker_with_progress_lines(module_source):
    """The command and requests come from the bridge (python -m latentharmonize worker); its output is read by a
    thread and handed over on the main thread by a QTimer; Cancel kills the worker's process tree."""
    tree = ast.parse(module_source)
    start = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "start")
    text = ast.unparse(start)
    assert "stdin=subprocess.PIPE" in text and "threading.Thread" in text and "QTimer" in text
    assert "build_worker_command" in module_source and "backend_environment" in module_source
    assert "worker_request" in module_source and "can_reuse_worker" in module_source
    assert "kill_process_tree" in module_source
    assert builtins  # the checker's PYTHON_METHODS come from builtins' types


# ------------------------------------------------------------------------------------------- the logic with stubs
# Slicer itself cannot run here, but the module's process handling and dependency steps are plain Python around a
# few Slicer calls. With minimal stand-ins for those calls they run for real: a real backend-like child process,
# real threads and queues, real files.


class _FakeTimer:
    """qt.QTimer stand-in: the test fires ``timeout()`` by calling ``fire``."""

    created: list = []

    def __init__(self):
        self.callback, self.active = None, False
        _FakeTimer.created.append(self)

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, callback):
        assert signal == "timeout()"
        self.callback = callback

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def fire(self):
        if self.active:
            self.callback()


@__import__("contextlib").contextmanager
def _try_with_error_display(message=None, show=True, waitCursor=False):
    """slicer.util.tryWithErrorDisplay: shows the error, then re-raises it."""
    yield


def _load_module(monkeypatch, calls=None):
    """Import LatentHarmonize.py against stand-ins for slicer and qt (vtk is the real one)."""
    calls = calls if calls is not None else []
    slicer = types.ModuleType("slicer")
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {
        "__init__": lambda self: None, "addObserver": lambda self, *a: None, "removeObserver": lambda self, *a: None,
        "removeObservers": lambda self, *a: None})
    util.startupEnvironment = lambda: dict(os.environ)
    util.confirmOkCancelDisplay = lambda text, *a, **k: calls.append(("confirm", text)) or True
    util.arrayFromVTKMatrix = lambda m: np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
    util.tryWithErrorDisplay = _try_with_error_display
    slicer.util = util
    slicer.app = types.SimpleNamespace(connect=lambda signal, callback: calls.append(("app.connect", signal)),
                                       testingEnabled=lambda: False)
    for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode"):
        setattr(slicer, name, type(name, (), {}))
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr, i18n.translate = (lambda text: text), (lambda context, text: text)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *a, **k: None}))
    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (__import__("unittest").TestCase,),
                                          {"delayDisplay": lambda self, message, *a: calls.append(("delay", message))})
    qt = types.ModuleType("qt")
    qt.QTimer = _FakeTimer
    qt.QUrl = types.SimpleNamespace(fromLocalFile=lambda path: ("url", path))
    qt.QDesktopServices = types.SimpleNamespace(openUrl=lambda url: calls.append(("openUrl", url)))
    torch_utils = types.ModuleType("PyTorchUtils")

    class PyTorchUtilsLogic:
        def installTorch(self, **kwargs):
            calls.append(("installTorch", kwargs))

    torch_utils.PyTorchUtilsLogic = PyTorchUtilsLogic
    stand_ins = {"slicer": slicer, "slicer.util": util, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
                 "slicer.ScriptedLoadableModule": slm, "qt": qt, "PyTorchUtils": torch_utils}
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("LatentHarmonize_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A stand-in for the backend worker that talks its protocol: per request, a log line with the request, progress, and
# the result line (an error for a CT named *nolung*); it exits without answering for *crash* and hangs for *slow*.
FAKE_WORKER = """
import json, sys, time
from latentharmonize.worker_protocol import WorkerResult, format_result_line
for line in sys.stdin:
    request = json.loads(line)
    print("request " + line.strip(), flush=True)
    print("LH-PROGRESS 10 load reading", flush=True)
    if "crash" in request["ct"]:
        raise SystemExit(3)
    if "slow" in request["ct"]:
        time.sleep(60)
    if "stubborn" in request["ct"]:
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("LH-PROGRESS 20 encode ignoring SIGTERM", flush=True)
        time.sleep(60)
    print("LH-PROGRESS 100 done results", flush=True)
    if "nolung" in request["ct"]:
        result = WorkerResult(False, request["id"], error="No lung found.", error_type="NoLungFoundError", exit_code=2)
    else:
        result = WorkerResult(True, request["id"], out=request["out"], seconds=0.1)
    print(format_result_line(result), flush=True)
"""


def _wait(condition, timeout=30.0, tick=None):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        if tick:
            tick()
        time.sleep(0.02)
    assert condition(), "timed out"


@pytest.fixture()
def fake_python(tmp_path) -> Path:
    """An executable that runs FAKE_WORKER whatever its arguments (it stands in for PythonSlicer)."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    executable = tmp_path / "PythonSlicer"
    executable.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    executable.chmod(0o755)
    return executable


def _fake_worker(module, fake_python):
    from latentharmonize import slicer_bridge as bridge

    command = bridge.build_worker_command(fake_python)
    worker = module.BackendWorker(bridge.worker_launch(command, {}, MODULE_DIR))
    worker.start()
    return worker


def _analysis(module, worker, folder, ct="chest.nrrd", **callbacks):
    from latentharmonize import slicer_bridge as bridge

    finished = []
    run = module.AnalysisRun(worker, bridge.worker_request(folder / ct, folder / "out"), folder, "chest", None,
                             onFinished=lambda job, code: finished.append(code), **callbacks)
    run.start()
    return run, finished


def test_worker_serves_analyses_one_after_another(monkeypatch, tmp_path, fake_python):
    module = _load_module(monkeypatch)
    worker = _fake_worker(module, fake_python)
    progress, log = [], []
    first, finished = _analysis(module, worker, tmp_path, onLog=log.append,
                                onProgress=lambda e: progress.append((e.percent, e.stage)))
    assert worker.run is first
    _wait(lambda: finished, tick=worker._timer.fire)
    assert finished == [0] and first.returncode == 0 and not first.cancelled and worker.run is None
    assert progress == [(10, "load"), (100, "done")]
    assert len(log) == 1 and json.loads(log[0][len("request "):])["ct"] == str(tmp_path / "chest.nrrd")
    assert first.inputPath == tmp_path / "input" / "chest.nrrd" and first.outputFolder == tmp_path / "out"

    pid = worker.process.pid
    second, finished = _analysis(module, worker, tmp_path)
    _wait(lambda: finished, tick=worker._timer.fire)
    assert finished == [0] and worker.alive() and worker.process.pid == pid

    worker.stop()  # end of input: the worker exits by itself
    assert worker.process.wait(timeout=30) == 0


def test_failed_analysis_keeps_the_backend_message_and_the_worker(monkeypatch, tmp_path, fake_python):
    module = _load_module(monkeypatch)
    worker = _fake_worker(module, fake_python)
    run, finished = _analysis(module, worker, tmp_path, ct="nolung.nrrd")
    _wait(lambda: finished, tick=worker._timer.fire)
    assert finished == [2] and run.log.failure_message(2) == "No lung found."
    _, finished = _analysis(module, worker, tmp_path)
    _wait(lambda: finished, tick=worker._timer.fire)
    assert finished == [0]
    worker.stop()


def test_worker_ending_without_an_answer_fails_the_analysis(monkeypatch, tmp_path, fake_python):
    module = _load_module(monkeypatch)
    worker = _fake_worker(module, fake_python)
    run, finished = _analysis(module, worker, tmp_path, ct="crash.nrrd")
    _wait(lambda: finished, tick=worker._timer.fire)
    assert finished == [3] and "exit code 3" in run.log.failure_message(3) and not worker.alive()


def test_cancel_never_waits_for_a_backend_that_ignores_sigterm(monkeypatch, tmp_path, fake_python):
    """Cancel (and scene close, and exit) run on Slicer's GUI thread: they return at once; the kill of a backend that
    ignores SIGTERM follows after the grace period, in a thread, and the run still completes as cancelled."""
    module = _load_module(monkeypatch)
    worker = _fake_worker(module, fake_python)
    progress = []
    run, finished = _analysis(module, worker, tmp_path, ct="stubborn.nrrd", onProgress=progress.append)
    _wait(lambda: len(progress) == 2, tick=worker._timer.fire)
    run.cancel()
    # returned within the 5 s grace period (the backend still runs), and no request can go to a worker being killed
    assert worker.process.poll() is None and not worker.alive()
    _wait(lambda: finished, timeout=20, tick=worker._timer.fire)
    assert run.cancelled and finished[0] != 0 and worker.process.poll() == -9


def test_cancel_kills_the_worker_and_still_reports(monkeypatch, tmp_path, fake_python):
    module = _load_module(monkeypatch)
    worker = _fake_worker(module, fake_python)
    progress = []
    run, finished = _analysis(module, worker, tmp_path, ct="slow.nrrd", onProgress=progress.append)
    _wait(lambda: progress, tick=worker._timer.fire)
    run.cancel()
    _wait(lambda: finished, tick=worker._timer.fire)
    # stopped by Cancel's SIGTERM, not left to end its 60 s sleep
    assert run.cancelled and finished[0] != 0 and not worker.alive() and worker.process.poll() == -signal.SIGTERM
    run.cancel()  # a second Cancel after the end does nothing


class _FakeVolume:
    def __init__(self, name, ijk_to_ras, transform=None):
        self.name, self.ijk_to_ras, self.transform = name, ijk_to_ras, transform

    def GetName(self):
        return self.name

    def GetParentTransformNode(self):
        return self.transform

    def GetIJKToRASMatrix(self, matrix):
        for i in range(4):
            for j in range(4):
                matrix.SetElement(i, j, self.ijk_to_ras[i][j])


def test_start_analysis_writes_the_input_and_keeps_one_worker(monkeypatch, tmp_path, fake_python):
    module = _load_module(monkeypatch)
    ct = (np.arange(3 * 4 * 5).reshape(3, 4, 5) - 900).astype(np.int16)
    ijk_to_ras = [[-0.7, 0, 0, 10.0], [0, -0.7, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]]
    module.slicer.util.arrayFromVolume = lambda node: ct
    folders = iter(range(100))
    module.slicer.util.tempDirectory = lambda key: str(tmp_path / f"{key}-{next(folders)}")
    module.slicer.util.startupEnvironment = lambda: {**os.environ, "PYTHONPATH": "/opt/extra"}
    monkeypatch.setattr(module.LatentHarmonizeLogic, "pythonSlicerExecutable", staticmethod(lambda: str(fake_python)))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    volume = _FakeVolume("CT chest", ijk_to_ras)

    logic = module.LatentHarmonizeLogic()
    assert logic.worker is None  # started on the first Analyze only
    log, finished = [], []
    run = logic.startAnalysis(volume, modelPath=bundle, device="GPU", onLog=log.append,
                              onFinished=lambda job, code: finished.append(code))
    worker = logic.worker
    assert worker.launch.command == (str(fake_python), "-m", "latentharmonize", "worker", "--idle-timeout", "600")
    assert dict(worker.launch.environment)["PYTHONPATH"].split(os.pathsep) == [str(MODULE_DIR), "/opt/extra"]
    written = tmp_path / "LatentHarmonize-0" / "input" / "CT_chest.nrrd"
    image = sitk.ReadImage(str(written))  # the run completes only when the (stand-in) timer fires
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct)
    np.testing.assert_allclose(image.GetOrigin(), (-10.0, -20.0, -30.0))
    _wait(lambda: finished, tick=worker._timer.fire)
    assert json.loads(log[0][len("request "):]) == {  # no QC pictures or report: built on demand (Open report)
        "ct": str(written), "out": str(tmp_path / "LatentHarmonize-0" / "out"), "mask": None, "model": str(bundle),
        "device": "cuda", "overwrite": False, "report": False, "id": None}
    assert run.inputPath == written and finished == [0]
    assert not written.parent.exists()  # the uncompressed CT copy does not outlive the run

    again = logic.startAnalysis(volume, modelPath=bundle)  # the next Analyze goes to the same process
    assert again.worker is worker and again.runFolder == tmp_path / "LatentHarmonize-1"
    _wait(lambda: again.returncode is not None, tick=worker._timer.fire)
    again.worker.kill()  # as Cancel does: the next Analyze starts a fresh worker
    fresh = logic.startAnalysis(volume, modelPath=bundle)
    assert fresh.worker is not worker and fresh.worker.alive()
    logic.stopWorker()  # scene close, module cleanup
    assert logic.worker is None and fresh.worker.process.wait(timeout=30) == 0

    with pytest.raises(ValueError, match="Select an input CT volume"):
        logic.startAnalysis(None, modelPath=bundle)


def _logic_with_fake_python(monkeypatch, module, fake_python):
    module.slicer.util.startupEnvironment = lambda: dict(os.environ)
    monkeypatch.setattr(module.LatentHarmonizeLogic, "pythonSlicerExecutable", staticmethod(lambda: str(fake_python)))
    return module.LatentHarmonizeLogic()


def test_opening_the_module_starts_a_preloading_worker_that_analyze_then_uses(monkeypatch, tmp_path, fake_python):
    module = _load_module(monkeypatch)
    logic = _logic_with_fake_python(monkeypatch, module, fake_python)
    logic.prestartWorker(module.DEFAULT_MODEL, "GPU")
    worker = logic.worker
    assert worker.alive() and worker.preload == ["--preload", str(module.DEFAULT_MODEL), "--preload-device", "cuda"]
    assert "--preload" not in worker.launch.command  # the launch an Analyze compares with stays the plain one
    logic.prestartWorker(module.DEFAULT_MODEL, "GPU")  # opening the module again keeps the running worker
    assert logic.worker is worker

    module.slicer.util.arrayFromVolume = lambda node: np.full((3, 4, 5), -900, np.int16)
    module.slicer.util.tempDirectory = lambda key: str(tmp_path / key)
    volume = _FakeVolume("CT", [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    run = logic.startAnalysis(volume, modelPath=module.DEFAULT_MODEL)
    assert run.worker is worker  # the first Analyze goes to the preloaded process
    _wait(lambda: run.returncode is not None, tick=worker._timer.fire)
    assert run.returncode == 0
    logic.stopWorker()
    assert worker.process.wait(timeout=30) == 0


def _dependency_module(monkeypatch, tmp_path, requirements, packaging="absent", min_torch=">=2.1", calls=None):
    """The module with a requirements file of its own; ``packaging``: a stand-in slicer.packaging that only an
    explicit import finds (as in a freshly started Slicer >= 5.12), or None for Slicer <= 5.10 (no such module)."""
    calls = calls if calls is not None else []
    module = _load_module(monkeypatch, calls=calls)
    path = tmp_path / "requirements.txt"
    path.write_text(requirements)
    monkeypatch.setattr(module, "REQUIREMENTS", path)
    monkeypatch.setattr(module, "MIN_TORCH", min_torch)
    if packaging is None:
        monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # import fails like in Slicer 5.10
    elif packaging != "absent":
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    return module, path


def test_one_question_for_pytorch_and_packages_then_slicer_packaging(monkeypatch, tmp_path):
    """Slicer >= 5.12: ``slicer.packaging`` exists but is not an attribute of ``slicer`` until imported; the module
    imports it, asks once for everything (an installed PyTorch that is too old included) and lets pip_ensure spare
    Slicer's packages."""
    calls = []

    def pip_ensure(requirements, **kwargs):
        calls.append(("pip_ensure", list(requirements), kwargs))
        path.write_text("")  # installed

    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = pip_ensure
    module, path = _dependency_module(monkeypatch, tmp_path, "pandas>=2.0\nno-such-package-for-latentharmonize>=1.0\n",
                                      packaging=packaging, min_torch=">=999", calls=calls)
    torch_utils = sys.modules["PyTorchUtils"].PyTorchUtilsLogic
    monkeypatch.setattr(torch_utils, "installTorch", lambda self, **kwargs: calls.append(("installTorch", kwargs))
                        or monkeypatch.setattr(module, "MIN_TORCH", ">=0"))
    assert not hasattr(module.slicer, "packaging")
    logic = module.LatentHarmonizeLogic()
    assert not logic.dependenciesInstalled()
    logic.ensureDependencies()
    logic.ensureDependencies()  # checked once per session
    assert [c[0] for c in calls] == ["confirm", "installTorch", "pip_ensure"]
    question = calls[0][1]
    assert "PyTorch" in question and ">=999 is needed" in question and "no-such-package-for-latentharmonize" in question
    assert "pandas" not in question  # installed already
    assert calls[1][1] == {"askConfirmation": False, "torchVersionRequirement": ">=999"}
    assert calls[2][1] == ["no-such-package-for-latentharmonize>=1.0"]
    assert calls[2][2] == {"skip_packages": ["SimpleITK", "torch", "vtk"], "prompt_install": False,
                           "requester": "LatentHarmonize"}
    assert logic.dependenciesInstalled()


def test_dependencies_fall_back_to_pip_install_without_slicer_packaging(monkeypatch, tmp_path):
    calls = []
    module, path = _dependency_module(monkeypatch, tmp_path, "no-such-package-for-latentharmonize>=1.0  # missing\n",
                                      packaging=None, calls=calls)
    module.slicer.util.pip_install = lambda requirements, **k: calls.append(("pip_install", requirements)) \
        or path.write_text("")
    module.LatentHarmonizeLogic().ensureDependencies()
    assert [c[0] for c in calls] == ["confirm", "pip_install"]  # PyTorch is installed here: not asked for
    assert calls[1][1] == "'no-such-package-for-latentharmonize>=1.0'"  # only what is missing, shell-quoted


def test_declined_or_failed_installation_is_explained(monkeypatch, tmp_path):
    module, _ = _dependency_module(monkeypatch, tmp_path, "no-such-package-for-latentharmonize>=1.0\n", packaging=None)
    module.slicer.util.confirmOkCancelDisplay = lambda *a, **k: False
    with pytest.raises(RuntimeError, match="Installation declined"):
        module.LatentHarmonizeLogic().ensureDependencies()
    module.slicer.util.confirmOkCancelDisplay = lambda *a, **k: True
    module.slicer.util.pip_install = lambda requirements, **k: None  # pip "succeeds" but the package is still absent
    with pytest.raises(RuntimeError, match="did not complete"):
        module.LatentHarmonizeLogic().ensureDependencies()


def test_missing_pytorch_extension_is_explained_only_when_pytorch_is_needed(monkeypatch, tmp_path):
    module, _ = _dependency_module(monkeypatch, tmp_path, "", min_torch=">=999")
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails like an absent extension
    with pytest.raises(RuntimeError, match="Install 'PyTorch' from the Extensions Manager"):
        module.LatentHarmonizeLogic().ensureDependencies()
    monkeypatch.setattr(module, "MIN_TORCH", ">=2.1")  # an installed, recent PyTorch needs no extension code
    module.LatentHarmonizeLogic().ensureDependencies()


def test_opening_the_module_checks_dependencies_without_importing_pytorch(monkeypatch, tmp_path):
    """enter() -> prestartWorker -> dependenciesInstalled reads package metadata only: with ``import torch`` and
    PyTorchUtils made to fail, it still answers, and a too old PyTorch counts as missing."""
    module, _ = _dependency_module(monkeypatch, tmp_path, "")
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    assert module.LatentHarmonizeLogic().dependenciesInstalled()
    monkeypatch.setattr(module, "MIN_TORCH", ">=999")
    logic = module.LatentHarmonizeLogic()
    assert not logic.dependenciesInstalled() and logic.prestartWorker() is False and logic.worker is None


def test_requirements_leave_out_monai_which_the_analysis_never_imports():
    """monai is imported only by training (train.py, training_data.py); the modules the worker, analyze, the report
    and the Slicer bridge reach (following every relative import, also inside functions) never import it."""
    package = MODULE_DIR / "latentharmonize"

    def source(name):  # dotted name below the package ("" is the package itself) -> its file, or None
        path = package.joinpath(*name.split(".")) if name else package
        return next((f for f in (path.with_suffix(".py"), path / "__init__.py") if f.is_file()), None)

    def imports(name):
        file = source(name)
        here = name.split(".") if file.name == "__init__.py" and name else name.split(".")[:-1]
        tree = ast.parse(file.read_text(encoding="utf-8"))
        inner, outer = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[:len(here) - node.level + 1]
                inner |= ({".".join(base + node.module.split("."))} if node.module
                          else {".".join(base + [a.name]) for a in node.names})
            elif isinstance(node, ast.ImportFrom) and node.module:
                outer.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                outer |= {a.name.split(".")[0] for a in node.names}
        return {n for n in inner if source(n) is not None}, outer

    seen, todo, external = set(), ["worker", "analyze_command", "pipeline", "slicer_bridge", "cli", ""], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            inner, outer = imports(name)
            external |= outer
            todo += sorted(inner)
    assert "monai" not in external
    assert not {n.split(".")[0] for n in seen} & {"training", "evaluation", "phantom", "batch"}
    requirements = (MODULE_DIR / "Resources" / "requirements.txt").read_text()
    assert not re.search(r"^monai", requirements, re.M)


# QC and export against a stand-in segmentation node holding numpy masks, on analyze outputs written by the
# backend's writers (fixture ``outputs`` of test_slicer_bridge.py)


class _FakeSegment:
    def __init__(self, name, color):
        self.name, self.color = name, tuple(color)

    def GetName(self):
        return self.name

    def SetName(self, name):
        self.name = name

    def GetColor(self):
        return self.color

    def SetColor(self, r, g, b):
        self.color = (r, g, b)


class _FakeSegmentationNode:
    """Segments as boolean masks on the CT grid; attributes as a dict."""

    def __init__(self, name, masks, references=None):
        self.name, self.masks, self.attributes = name, dict(masks), {}
        self.segments = {sid: _FakeSegment(f"Label_{i}", (0.5, 0.5, 0.5)) for i, sid in enumerate(masks)}
        self.references = dict(references or {})

    def GetReferenceImageGeometryReferenceRole(self):
        return "referenceImageGeometryRef"

    def GetNodeReference(self, role):
        return self.references.get(role)

    def SetNodeReferenceID(self, role, node_id):
        self.references[role] = node_id

    def GetName(self):
        return self.name

    def GetID(self):
        return "vtkMRMLSegmentationNode1"

    def GetAttribute(self, key):
        return self.attributes.get(key)

    def SetAttribute(self, key, value):
        self.attributes[key] = value

    def GetSegmentation(self):
        node = self
        return types.SimpleNamespace(GetSegment=lambda sid: node.segments.get(sid),
                                     GetSegmentIDs=lambda: tuple(node.segments))

    def RemoveSegment(self, sid):
        del self.segments[sid], self.masks[sid]


class _SceneVolume:
    """A volume node stand-in holding its voxels (``arrayFromVolume``) and geometry."""

    def __init__(self, node_id, array, ijk_to_ras=IJK_TO_RAS, name="CT chest"):
        self.node_id, self.array, self.ijk_to_ras, self.name = node_id, array, np.asarray(ijk_to_ras), name

    def GetID(self):
        return self.node_id

    def GetName(self):
        return self.name

    def GetIJKToRASMatrix(self, matrix):
        for i in range(4):
            for j in range(4):
                matrix.SetElement(i, j, self.ijk_to_ras[i][j])


def _qc_module(monkeypatch, events, reference=None):
    """The module with stand-ins for the Slicer calls of QC and export. Every segment array is asked for in the
    geometry of ``reference`` (the segmentation's recorded reference volume), whatever volume is selected."""
    module = _load_module(monkeypatch)
    util = module.slicer.util
    util.arrayFromVolume = lambda volume: volume.array

    def segment_array(seg, sid, ref):
        assert reference is None or ref is reference, f"segment read in the geometry of {ref.GetID()}"
        return seg.masks[sid].astype(np.uint8)

    def update(array, seg, sid, ref):
        assert reference is None or ref is reference
        seg.masks[sid] = np.asarray(array) > 0

    util.arrayFromSegmentBinaryLabelmap = segment_array
    util.updateSegmentBinaryLabelmapFromArray = update
    util.saveNode = lambda node, path: events.append(("save", node, Path(path).name)) or Path(path).write_text("x") \
        or True
    module.slicer.vtkSlicerSegmentationsModuleLogic = types.SimpleNamespace(
        Flagged=3, Completed=2, SetSegmentStatus=lambda segment, status: events.append(("status", segment.name, status)))
    module.slicer.mrmlScene = types.SimpleNamespace(
        AddNewNodeByClass=lambda cls, name: events.append(("add", cls, name)) or _ParameterNode(cls),
        RemoveNode=lambda node: events.append(("remove", node.cls)))
    module.slicer.vtkMRMLSliceNode = types.SimpleNamespace(
        CenteredJumpSlice=1, JumpAllSlices=lambda scene, r, a, s, mode: events.append(("jump", (r, a, s), mode)))
    return module


class _ParameterNode:
    def __init__(self, cls):
        self.cls, self.parameters = cls, {}

    def SetParameter(self, key, value):
        self.parameters[key] = value

    def GetID(self):
        return f"{self.cls}1"


def _result_segmentation(module, outputs, reference):
    """A result segmentation as loadResults leaves it in the scene (and as a saved scene brings it back): segments,
    the recorded reference volume and lung map, labels, model ID, no file of the analysis folder needed."""
    from latentharmonize import slicer_bridge as bridge

    definitions = bridge.read_segment_definitions(outputs["out"] / "chest.seg.nrrd")
    lungs = _SceneVolume("vtkMRMLLabelMapVolumeNode1", outputs["lungs"])
    segmentation = _FakeSegmentationNode(
        "chest clusters", {d.segment_id: outputs["labels"] == d.label for d in definitions},
        {module.CLUSTERED_VOLUME_ROLE: reference, module.LUNGS_REFERENCE_ROLE: lungs})
    module.LatentHarmonizeLogic.applySegmentDefinitions(segmentation, definitions)
    segmentation.attributes.update({module.NAME_ATTRIBUTE: "chest", module.MODEL_ID_ATTRIBUTE: "abc123",
                                    module.ORIGINAL_LABELS_ATTRIBUTE: json.dumps([d.label for d in definitions])})
    return segmentation, {d.label: d.segment_id for d in definitions}


def test_qc_and_export_on_a_segmentation(monkeypatch, outputs, tmp_path):
    """Everything runs on the segmentation's reference volume and the lung map in the scene: the analysis folder is
    deleted first, as after a scene reload in a later session."""
    import shutil

    events = []
    reference = _SceneVolume("vtkMRMLScalarVolumeNode1", outputs["ct"])
    module = _qc_module(monkeypatch, events, reference)
    logic = module.LatentHarmonizeLogic()
    segmentation, ids = _result_segmentation(module, outputs, reference)
    labels = outputs["labels"]
    before = outputs["table"].set_index(["region", "label"])
    shutil.rmtree(outputs["out"])
    shutil.rmtree(outputs["ct_path"].parent)

    assert {s.name for s in segmentation.segments.values()} == {"normal", "emphysema", "ground_glass"}
    assert logic.segmentLabels(segmentation) == {ids[1]: 1, ids[2]: 2, ids[3]: 3}

    # status and jump
    logic.setClusterStatus(segmentation, [ids[2]], module.slicer.vtkSlicerSegmentationsModuleLogic.Flagged)
    center = logic.jumpToLargestRegion(segmentation, ids[2])
    assert ("status", "emphysema", 3) in events and ("jump", center, 1) in events
    k, j, i = np.argwhere(labels == 2).mean(axis=0)
    np.testing.assert_allclose(center, (IJK_TO_RAS @ [i, j, k, 1])[:3], atol=2.5)

    # rename, then merge ground glass into emphysema: the composition adds up
    logic.renameCluster(segmentation, ids[3], "GGO")
    with pytest.raises(Exception, match="already named"):
        logic.renameCluster(segmentation, ids[3], "normal")
    assert logic.mergeClusters(segmentation, [ids[2], ids[3]]) == ids[2]
    assert ids[3] not in segmentation.segments and segmentation.masks[ids[2]].sum() == np.isin(labels, [2, 3]).sum()
    after = logic.recomputeComposition(segmentation).set_index(["region", "label"])
    assert after.loc[("whole", 2), "fraction"] == pytest.approx(
        before.loc[("whole", 2), "fraction"] + before.loc[("whole", 3), "fraction"])
    assert set(after.loc["whole"].index) == {1, 2}
    assert after.loc[("whole", 1), "mean_hu"] == pytest.approx(before.loc[("whole", 1), "mean_hu"])

    # a segment painted in the Segment Editor (which overwrites other segments) becomes a new cluster
    drawn = np.zeros_like(labels, dtype=bool)
    drawn[:, :, 4:9] = True
    for sid in segmentation.masks:
        segmentation.masks[sid] = segmentation.masks[sid] & ~drawn
    segmentation.masks["drawn"] = drawn
    segmentation.segments["drawn"] = _FakeSegment("vessel", (1, 0, 0))
    whole = logic.recomputeComposition(segmentation).query("region == 'whole'").set_index("label")
    lung = outputs["lungs"] > 0
    assert whole.loc[4, "name"] == "vessel"
    assert 0 < whole.loc[4, "fraction"] == pytest.approx((drawn & lung).sum() / lung.sum())
    assert whole.fraction.sum() == pytest.approx(1.0)

    # export: composition of the edited clusters, statistics of all segments, the .seg.nrrd, densitometry
    stats_module = types.ModuleType("SegmentStatistics")
    used = {}

    class SegmentStatisticsLogic:
        def getParameterNode(self):
            raise AssertionError("the Segment Statistics module's shared parameter node must stay untouched")

        def setParameterNode(self, node):
            used["node"] = node

        def computeStatistics(self):
            events.append(("stats", dict(used["node"].parameters)))

        def exportToTable(self, table):
            events.append(("table", table.cls))

        def exportToCSVFile(self, path):
            Path(path).write_text("Segment,volume\n")

    stats_module.SegmentStatisticsLogic = SegmentStatisticsLogic
    monkeypatch.setitem(sys.modules, "SegmentStatistics", stats_module)
    monkeypatch.setattr(module.LatentHarmonizeLogic, "placeBeside", staticmethod(lambda node, reference: None))
    densitometry = object()
    written = logic.exportResults(segmentation, tmp_path / "export", densitometry)
    assert [p.name for p in written] == ["chest_composition.csv", "chest_composition.json",
                                         "chest_segment_statistics.csv", "chest.seg.nrrd", "chest_densitometry.csv"]
    assert all(p.is_file() for p in written)
    stats = next(e[1] for e in events if e[0] == "stats")
    assert stats == {"Segmentation": "vtkMRMLSegmentationNode1", "ScalarVolume": "vtkMRMLScalarVolumeNode1",
                     "visibleSegmentsOnly": "False"}  # the clusters' CT; hidden clusters are measured too
    assert used["node"].cls == "vtkMRMLScriptedModuleNode" and ("remove", "vtkMRMLScriptedModuleNode") in events
    assert ("save", densitometry, "chest_densitometry.csv") in events
    doc = json.loads(written[1].read_text())
    assert [c["name"] for c in doc["clusters"]] == ["normal", "emphysema", "vessel"] and doc["model_sha256"] == "abc123"


def test_qc_on_a_foreign_segmentation_says_to_run_analyze(monkeypatch, outputs):
    module = _qc_module(monkeypatch, [])
    reference = _SceneVolume("vtkMRMLScalarVolumeNode1", outputs["ct"])
    foreign = _FakeSegmentationNode("my segments", {"a": outputs["labels"] == 1},
                                     {module.CLUSTERED_VOLUME_ROLE: reference})
    with pytest.raises(ValueError, match="run Analyze first"):
        module.LatentHarmonizeLogic().recomputeComposition(foreign)
    orphan = _FakeSegmentationNode("my segments", {"a": outputs["labels"] == 1})
    with pytest.raises(ValueError, match="does not record the CT its clusters were computed on"):
        module.LatentHarmonizeLogic().jumpToLargestRegion(orphan, "a")


class _FakeTable:
    def __init__(self):
        self.columns, self.modifying = [], 0

    def StartModify(self):
        self.modifying += 1
        return 0

    def EndModify(self, was_modified):
        self.modifying -= 1

    def RemoveAllColumns(self):
        self.columns = []

    def AddColumn(self, column):
        self.columns.append(column)


class _Transformable:
    """Result node stand-in that records the transform it is placed under."""

    def __init__(self, cls, name):
        self.cls, self.name, self.transform, self.ijk = cls, name, "unset", None

    def SetAndObserveTransformNodeID(self, node_id):
        self.transform = node_id

    def SetIJKToRASMatrix(self, matrix):
        self.ijk = matrix

    def GetID(self):
        return f"{self.cls}1"


def test_load_results_builds_segmentation_tables_and_maps(monkeypatch, outputs):
    """What a run leaves in the scene: everything QC, export and a saved scene need (reference volume, lung map,
    labels, model ID, warnings), the densitometry table, all under the input's transform."""
    from latentharmonize import slicer_bridge as bridge

    module = _qc_module(monkeypatch, [])
    definitions = bridge.read_segment_definitions(outputs["out"] / "chest.seg.nrrd")
    made = {"tables": []}

    class LoadedSegmentation(_FakeSegmentationNode):
        transform = "unset"

        def SetName(self, name):
            self.name = name

        def SetReferenceImageGeometryParameterFromVolumeNode(self, volume):
            made["geometry_from"] = volume

        def CreateDefaultDisplayNodes(self):
            pass

        def GetDisplayNode(self):
            return types.SimpleNamespace(SetOpacity2DFill=lambda value: made.__setitem__("opacity", value))

        def SetAndObserveTransformNodeID(self, node_id):
            self.transform = node_id

    def load_segmentation(path):
        made["loaded"] = path
        return LoadedSegmentation("chest", {d.segment_id: outputs["labels"] == d.label for d in definitions})

    def add_node(cls, name):
        node = _FakeTable() if cls == "vtkMRMLTableNode" else _Transformable(cls, name)
        made["tables" if cls == "vtkMRMLTableNode" else cls] = made["tables"] + [node] \
            if cls == "vtkMRMLTableNode" else node
        return node

    util = module.slicer.util
    util.loadSegmentation = load_segmentation
    util.vtkMatrixFromArray = lambda array: ("matrix", np.asarray(array))
    util.updateVolumeFromArray = lambda node, array: setattr(node, "array", array)
    util.addVolumeFromArray = lambda array, ijk_to_ras, name: made.setdefault(
        "confidence", _Transformable("vtkMRMLScalarVolumeNode", name)) and setattr(
        made["confidence"], "data", (array, ijk_to_ras)) or made["confidence"]
    module.slicer.mrmlScene = types.SimpleNamespace(GenerateUniqueName=lambda name: name, AddNewNodeByClass=add_node)
    monkeypatch.setattr(module.LatentHarmonizeLogic, "placeBeside",
                        staticmethod(lambda node, ref: made.setdefault("placed", []).append(node)))
    volume = types.SimpleNamespace(GetName=lambda: "CT chest", GetID=lambda: "vtkMRMLScalarVolumeNode1",
                                   GetTransformNodeID=lambda: "vtkMRMLLinearTransformNode4")
    run = module.AnalysisRun([], {}, outputs["out"].parent, "chest", volume,
                             warnings=[{"code": "input_transformed", "message": "CT chest is under a transform"}])

    results = module.LatentHarmonizeLogic().loadResults(run)
    segmentation = results.segmentation
    assert made["loaded"] == str(outputs["out"] / "chest.seg.nrrd") and segmentation.name == "CT chest clusters"
    assert segmentation.references["referenceImageGeometryRef"] == "vtkMRMLScalarVolumeNode1" and made["opacity"] == 0.5
    assert segmentation.references[module.CLUSTERED_VOLUME_ROLE] == "vtkMRMLScalarVolumeNode1"
    assert {s.name: s.color for s in segmentation.segments.values()} == {d.name: d.color for d in definitions}
    attributes = segmentation.attributes
    assert json.loads(attributes[module.ORIGINAL_LABELS_ATTRIBUTE]) == [1, 2, 3]
    assert attributes[module.MODEL_ID_ATTRIBUTE] == "abc123"
    assert [w["code"] for w in module.LatentHarmonizeLogic.storedWarnings(segmentation)] == [
        "input_transformed", "thin_slices"]  # the module's own, then analysis.json's

    lungs = made["vtkMRMLLabelMapVolumeNode"]
    assert segmentation.references[module.LUNGS_REFERENCE_ROLE] == lungs.GetID()
    np.testing.assert_array_equal(lungs.array, outputs["lungs"])
    np.testing.assert_allclose(lungs.ijk[1], IJK_TO_RAS, atol=1e-6)
    confidence = made["confidence"]
    assert confidence.name == "CT chest confidence" and confidence.data[0].shape == outputs["ct"].shape
    np.testing.assert_allclose(confidence.data[1][1], IJK_TO_RAS, atol=1e-6)
    assert {n.transform for n in (segmentation, lungs, confidence)} == {"vtkMRMLLinearTransformNode4"}

    table, densitometry = made["tables"]
    assert table.modifying == 0
    titles = [c.GetName() for c in table.columns]
    assert titles == ["Region", "Label", "Cluster", "Fraction (%)", "Volume (mL)", "Mean (HU)", "SD (HU)"]
    rows = table.columns[0].GetNumberOfValues()
    assert rows == len(outputs["table"])
    fractions = [table.columns[3].GetValue(r) for r in range(rows)]
    np.testing.assert_allclose(fractions, outputs["table"].fraction * 100, rtol=1e-5)
    assert [table.columns[2].GetValue(r) for r in range(rows)] == list(outputs["table"].name)
    assert [c.GetName() for c in densitometry.columns] == list(bridge.DENSITOMETRY_TITLES.values())
    assert [densitometry.columns[0].GetValue(r) for r in range(3)] == ["whole", "right", "left"]
    assert densitometry.columns[1].GetValue(0) == pytest.approx(outputs["densitometry"][0]["laa950_pct"])
    assert results.densitometry is densitometry and len(made["placed"]) == 5
