"""The layers import only downward, and only the vLLM integration modules import vLLM.

    vq_decoder  <-  model_registry  <-  engine  <-  server (HTTP), bench  <-  cli

docs/ARCHITECTURE.md explains the layers; this test keeps the code to them."""

from __future__ import annotations

import ast
from pathlib import Path

from .helpers import REPO

LAYERS = {"vq_decoder": 0, "model_registry": 1, "engine": 2, "server": 3, "bench": 3, "jobs": 4,
          "cli": 5}
# The modules a vLLM upgrade re-checks: the runtime side, then the model plugin's.
VLLM_MODULES = {"engine/vllm_api.py", "model_registry/plugin.py",
                "model_registry/vllm_model.py", "model_registry/cfg.py"}


def imported_modules(source: str) -> list[str]:
    """Every absolute module a source imports, at any depth (function-level imports too)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def violations(package: str, source: str) -> list[str]:
    """Imports of a package from a higher layer, or from a sibling of the same layer."""
    found = []
    for name in imported_modules(source):
        top = name.split(".")[0]
        if top in LAYERS and top != package and LAYERS[top] >= LAYERS[package]:
            found.append(name)
    return found


def project_modules() -> list[Path]:
    return sorted(p for package in LAYERS for p in (REPO / package).rglob("*.py"))


def test_every_layer_is_found():
    packages = {p.relative_to(REPO).parts[0] for p in project_modules()}
    assert packages == set(LAYERS)


def test_the_checker_sees_upward_and_sibling_imports():
    source = "import os\ndef f():\n    from server.app import create_app\n    import bench.serve\n"
    assert violations("engine", source) == ["server.app", "bench.serve"]
    assert violations("server", source) == ["bench.serve"]  # a sibling, not below
    assert violations("cli", source) == []


def test_layers_import_only_downward():
    upward = {str(path.relative_to(REPO)): bad for path in project_modules()
              if (bad := violations(path.relative_to(REPO).parts[0], path.read_text()))}
    assert upward == {}


def test_only_the_integration_modules_import_vllm():
    users = {str(path.relative_to(REPO)) for path in project_modules()
             if any(name.split(".")[0] == "vllm" for name in imported_modules(path.read_text()))}
    assert users == VLLM_MODULES
