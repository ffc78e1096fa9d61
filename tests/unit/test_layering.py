"""Package layering of ``sgl_elastic``, kept as data and enforced (like ``patches/table.py``).

Every ``import`` (module level and function-local) under ``sgl_elastic/`` is read with ``ast`` and
mapped to its top-level package (``sgl_elastic.<pkg>``). Rules:

1. a package imports only packages on lower levels of ``LEVELS`` (so no package-level cycle);
2. pure packages import neither SGLang nor ``torch.distributed``; ``NO_SGLANG`` packages never SGLang;
3. ``sgl_elastic.testing`` is imported by nothing in the package but itself and the demo
   (``tests/`` and ``bench/`` may);
4. the package graph has no cycle (checked on its own, so a bad ``LEVELS`` edit cannot hide one).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "sgl_elastic"

# Bottom to top; a package may import only packages on lower levels. (README "Layout" shows this.)
LEVELS: tuple[frozenset[str], ...] = (
    frozenset({"layout", "config", "version_check"}),
    frozenset({"moe"}),
    frozenset({"planner"}),
    frozenset({"executor", "kernels"}),
    frozenset({"memory"}),
    frozenset({"daemon"}),
    frozenset({"controller"}),
    frozenset({"rank"}),
    frozenset({"patches", "compat"}),
    frozenset({"launch_server"}),
    frozenset({"testing"}),
    frozenset({"demo"}),
)
PURE = frozenset({"layout", "planner", "moe"})
NO_SGLANG = PURE | {"executor", "kernels", "memory", "daemon"}
MAY_IMPORT_TESTING = frozenset({"testing", "demo"})


def _package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(dotted module, line) of every import in ``path``, relative ones resolved."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    pkg_parts = list(rel.parts[:-1])  # the package a relative import starts from
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, list[str]], list[str]]:
    """(package -> other sgl_elastic packages it imports, package -> its import sites, every package)."""
    deps: dict[str, set[str]] = {}
    sites: dict[str, list[str]] = {}
    packages = sorted({_package_of(p) for p in ROOT.rglob("*.py")} - {"__init__", "__main__"})
    for path in sorted(ROOT.rglob("*.py")):
        pkg = _package_of(path)
        for mod, line in _imports(path):
            parts = mod.split(".")
            where = f"{path.relative_to(ROOT.parent)}:{line}: {mod}"
            if parts[0] == "sgl_elastic" and len(parts) > 1 and parts[1] in packages and parts[1] != pkg:
                deps.setdefault(pkg, set()).add(parts[1])
            sites.setdefault(pkg, []).append(where)
    return deps, sites, packages


def _level(pkg: str) -> int:
    return next(i for i, names in enumerate(LEVELS) if pkg in names)


def _where(sites: dict[str, list[str]], pkg: str, target: str) -> list[str]:
    return [w for w in sites.get(pkg, []) if w.split(": ", 1)[1].startswith(target)]


def test_every_package_has_a_level():
    _, _, packages = _graph()
    placed = set().union(*LEVELS)
    missing = sorted(set(packages) - placed)
    assert not missing, f"packages {missing} have no place in LEVELS: add them to the level they belong to"


def test_packages_import_only_lower_levels():
    deps, sites, _ = _graph()
    bad = []
    for pkg, targets in sorted(deps.items()):
        for t in sorted(targets):
            if _level(t) >= _level(pkg):
                bad += [f"{pkg} (level {_level(pkg)}) imports {t} (level {_level(t)}): {w}"
                        for w in _where(sites, pkg, f"sgl_elastic.{t}")]
    assert not bad, "imports against the layering (move the code down, or invert the call):\n  " + "\n  ".join(bad)


def test_pure_packages_import_neither_sglang_nor_torch_distributed():
    _, sites, _ = _graph()
    bad = [w for pkg in sorted(PURE) for t in ("sglang", "torch.distributed") for w in _where(sites, pkg, t)]
    bad += [w for pkg in sorted(NO_SGLANG - PURE) for w in _where(sites, pkg, "sglang")]
    assert not bad, "SGLang / torch.distributed imported below the patches:\n  " + "\n  ".join(bad)


def test_daemon_imports_neither_patches_nor_controller():
    _, sites, _ = _graph()
    bad = [w for t in ("sgl_elastic.patches", "sgl_elastic.controller", "sglang") for w in _where(sites, "daemon", t)]
    assert not bad, "the daemon is the state plane only:\n  " + "\n  ".join(bad)


def test_only_the_demo_imports_testing_helpers():
    _, sites, packages = _graph()
    bad = [w for pkg in packages if pkg not in MAY_IMPORT_TESTING for w in _where(sites, pkg, "sgl_elastic.testing")]
    assert not bad, "production code imports sgl_elastic.testing (move the helper to its package):\n  " + "\n  ".join(bad)


def test_no_package_level_cycle():
    deps, _, packages = _graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(pkg: str, path: list[str]) -> None:
        state[pkg] = 1
        for t in sorted(deps.get(pkg, ())):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t] if t in path else [pkg, t]
                raise AssertionError(f"package import cycle: {' -> '.join(cycle)}")
            if t not in state:
                visit(t, [*path, t])
        state[pkg] = 2

    for pkg in packages:
        if pkg not in state:
            visit(pkg, [pkg])


def _module_graph() -> dict[str, set[str]]:
    """sgl_elastic module -> the sgl_elastic modules it imports (module level or in a function).
    ``from pkg import sub`` names the submodule only (a package's ``__init__`` runs first anyway)."""
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                subs = {f"{base}.{a.name}" for a in node.names}
                targets |= {s for s in subs if s in mods}
                if subs - set(mods):
                    targets.add(base)
        deps = set()
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t not in (name, "sgl_elastic"):
                deps.add(t)
        graph[name] = deps
    return graph


def test_no_module_import_cycle():
    """Two modules that import each other (even inside functions) are one concept split in two, or
    a flag kept in the wrong one; the package rule above cannot see it."""
    graph = _module_graph()
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for t in sorted(graph[mod]):
            if state.get(t) == 1:
                raise AssertionError(f"module import cycle: {' -> '.join(path[path.index(t):] + [t])}")
            if t not in state:
                visit(t, [*path, t])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


def test_every_module_of_patches_holds_hooks_of_the_table():
    """``patches/`` is one module per patched SGLang module: each (but the package and the table)
    holds a hook of ``PATCHES``; code that patches nothing lives in ``rank/`` or below."""
    from sgl_elastic.patches.table import PATCHES

    modules = {p.stem for p in (ROOT / "patches").glob("*.py")} - {"__init__", "table"}
    hooked = {row.hook.removeprefix("sgl_elastic.patches.").split(".")[0] for row in PATCHES}
    assert modules - hooked == set(), f"modules of patches/ that patch nothing: {sorted(modules - hooked)}"
