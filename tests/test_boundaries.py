"""The layers of docs/architecture.md, enforced: an import that crosses one fails here.

  foundation  errors, capability, ids, locks, quantity, faults, requestid: nothing of ours
              but errors
  node/       host helpers: no backend, no service, no protobuf
  backends/   storage systems: no service, no protobuf, no server
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "csi_driver"
FOUNDATION = {"errors", "capability", "ids", "locks", "quantity", "faults", "requestid",
              "metrics"}
# (layer prefix, prefixes it must not import)
RULES = [
    ("csi_driver.node", ("csi_driver.backends", "csi_driver.services", "csi_driver.csi",
                         "csi_driver.driver", "csi_driver.server", "csi_driver.config")),
    ("csi_driver.backends", ("csi_driver.services", "csi_driver.csi", "csi_driver.driver",
                             "csi_driver.server", "csi_driver.interceptors")),
    # The services see the driver through services/plugin.py's protocol.
    ("csi_driver.services", ("csi_driver.driver", "csi_driver.config", "csi_driver.server",
                             "csi_driver.cli")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every csi_driver module `path` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found |= {f"{prefix}.{a.name}" for a in node.names}  # `from .. import errors`
    return {m for m in found if m == "csi_driver" or m.startswith("csi_driver.")}


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_walk_sees_the_package() -> None:
    names = {_module_name(p) for p in MODULES}
    assert {"csi_driver.node.devices", "csi_driver.backends.nfs.tree"} <= names
    assert "csi_driver.capability" in _imports(PACKAGE / "node" / "devices.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_respect_the_layers(path: Path) -> None:
    name = _module_name(path)
    imported = _imports(path)
    if name.removeprefix("csi_driver.") in FOUNDATION:
        ours = {m for m in imported if m != "csi_driver"
                and m != "csi_driver.errors" and not m.startswith("csi_driver.errors.")}
        assert not ours, f"{name} is foundation; it imports {sorted(ours)}"
    for layer, banned in RULES:
        if name == layer or name.startswith(layer + "."):
            crossing = sorted(m for m in imported
                              if any(m == b or m.startswith(b + ".") for b in banned))
            assert not crossing, f"{name} crosses a layer: imports {crossing}"


def _fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_node_helpers_import_alone() -> None:
    _fresh("import csi_driver.node.devices")


def test_the_interface_loads_no_backend() -> None:
    out = _fresh("import sys, csi_driver.backends.base, csi_driver.backends as b\n"
                 "b.type_names()\n"
                 "print(sorted(m for m in sys.modules if m.startswith('csi_driver.backends.')))")
    assert out.strip() == "['csi_driver.backends.base']"
