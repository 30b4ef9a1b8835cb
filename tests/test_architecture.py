"""The layers of docs/ARCHITECTURE.md, checked on the source: imports only run downward, front ends use only
the public API, no module imports another package's private names, and there is no import circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "sdx4"

#: Layer of each module prefix, lowest first (docs/ARCHITECTURE.md). The longest matching prefix wins.
LAYERS = {
    "sdx4.options": 0, "sdx4.imageio": 0, "sdx4.metadata": 0, "sdx4.cache": 0, "sdx4._version": 0,
    "sdx4.speed": 1,
    "sdx4.model": 2,
    "sdx4.engine": 3,
    "sdx4.api": 4, "sdx4": 4, "sdx4.train": 4, "sdx4.video": 4,
    "sdx4.quality": 5, "sdx4.batch": 5, "sdx4.service": 5,
    "sdx4.cli": 6, "sdx4.__main__": 6, "sdx4.memory": 6, "sdx4.random_model": 6,
}  # fmt: skip
FRONT_ENDS = ("sdx4.cli", "sdx4.batch", "sdx4.service", "sdx4.quality")
#: What a front end may import besides its own package: the foundations and the public API (the CLI also
#: the other front ends it dispatches to).
PUBLIC = ("sdx4.options", "sdx4.imageio", "sdx4.metadata", "sdx4.cache", "sdx4._version", "sdx4.api", "sdx4", "sdx4.train", "sdx4.video")
#: (importer, imported) pairs allowed across the rule above, each with its reason.
EXCEPTIONS = {
    # The `sdx4` command restarts itself on tcmalloc before anything is loaded: a property of the process,
    # not of a model, so it is the CLI's business alone (src/sdx4/speed/allocator.py).
    ("sdx4.cli", "sdx4.speed.allocator"),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every sdx4 import of a module, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("sdx4"):
                continue
            names = [a.name for a in node.names]
            modules = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            out += [(m, [], node.lineno) for m in modules]
            rest = [n for n in names if f"{target}.{n}" not in mods]
            if rest:
                out.append((target, rest, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("sdx4")]
    return out


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _violations() -> dict[str, list[str]]:
    mods = _modules()
    found: dict[str, list[str]] = {"upward": [], "front_end": [], "private": []}
    for name, path in sorted(mods.items()):
        if name.startswith(FRONT_ENDS):  # the loaded model's parts are the engine's, not a front end's
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "components":
                    found["front_end"].append(f"{path.relative_to(SRC)}:{node.lineno} {name} uses .components")
        for target, names, line in _imports(name, path, mods):
            where = f"{path.relative_to(SRC)}:{line} {name} -> {target}"
            if _layer(target) > _layer(name):
                found["upward"].append(where)
            front = next((f for f in FRONT_ENDS if name == f or name.startswith(f + ".")), None)
            if front and not target.startswith(front) and target not in PUBLIC:
                allowed = front == "sdx4.cli" and any(target.startswith(f) for f in FRONT_ENDS)
                if not allowed and (front, target) not in EXCEPTIONS:
                    found["front_end"].append(where)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and _package(target) != _package(name):
                found["private"].append(f"{where} imports {', '.join(private)}")
    return found


def test_no_module_imports_a_layer_above_its_own():
    assert _violations()["upward"] == []


def test_front_ends_use_only_the_public_api():
    assert _violations()["front_end"] == []


def test_no_module_imports_a_private_name_of_another_package():
    assert _violations()["private"] == []


def test_the_layer_table_knows_every_module():
    """A new top-level module or package must be placed in a layer (and in docs/ARCHITECTURE.md)."""
    unknown = [m for m in _modules() if not any(m == p or m.startswith(p + ".") for p in LAYERS if p != "sdx4")]
    assert unknown == ["sdx4"]


def test_the_package_has_no_import_circle():
    tool = Path(__file__).resolve().parents[2] / "shared" / "tools" / "imports.py"
    if not tool.is_file():
        pytest.skip(f"{tool} is not beside this checkout")
    import json

    out = subprocess.run([sys.executable, str(tool), str(PKG)], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["circles"] == []


def test_importing_sdx4_and_its_front_ends_imports_no_torch():
    code = (
        "import sys, sdx4, sdx4.cli, sdx4.batch, sdx4.quality.methods, sdx4.service.requests; sdx4.cli.build_parser();"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": str(SRC)})
    assert out.stdout.strip() == "[]"


def test_the_layer_check_finds_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: an engine module importing the API is reported."""
    fake = tmp_path / "sdx4"
    (fake / "engine").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "api.py").write_text("")
    (fake / "engine" / "__init__.py").write_text("")
    (fake / "engine" / "loop.py").write_text("from ..api import load\nfrom ..cli.args import _quiet\n")
    (fake / "cli").mkdir()
    (fake / "cli" / "__init__.py").write_text("")
    (fake / "cli" / "args.py").write_text("from ..engine import loop\n\n\ndef f(up):\n    return up.components\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    found = _violations()
    assert [v.split(" ", 1)[1] for v in found["upward"]] == ["sdx4.engine.loop -> sdx4.api", "sdx4.engine.loop -> sdx4.cli.args"]
    assert [v.split(" ", 1)[1] for v in found["front_end"]] == ["sdx4.cli.args uses .components", "sdx4.cli.args -> sdx4.engine.loop"]
    assert [v.split(" ", 1)[1] for v in found["private"]] == ["sdx4.engine.loop -> sdx4.cli.args imports _quiet"]
