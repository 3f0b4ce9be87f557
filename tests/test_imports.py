"""The import graph of the package (docs/layout.md): no circles, and no module imports one on a
higher floor. Read from the source with ``ast`` (imports inside functions count too)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Floors, bottom up. A module may import modules of its own floor or below.
FLOORS = [
    ("rules", ["atom_fast.constants", "atom_fast.layout", "atom_fast.kernels", "atom_fast._C"]),
    ("checks", ["atom_fast.checks"]),
    ("backends", ["atom_fast.backends"]),
    ("statistics", ["atom_fast.statistics"]),
    ("loss", ["atom_fast.loss"]),
    ("public API", ["atom_fast"]),
    ("environment", ["atom_fast.environment", "atom_fast.allocator"]),  # for the driver and bench
    ("driver", ["atom_fast.distill"]),
]


def _modules():
    """module name -> source path, for atom_fast/ and kernels/ (installed as atom_fast.kernels)."""
    out = {}
    for base, prefix in ((ROOT / "atom_fast", "atom_fast"), (ROOT / "kernels", "atom_fast.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def _imports(name, path):
    """The atom_fast modules that ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``
    when ``sub`` is a module, else as ``pkg``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = []
            for a in node.names:
                full = f"{base}.{a.name}"
                targets.append(full if full in MODULES or full == "atom_fast._C" else base)
        else:
            continue
        for t in targets:
            if t == "atom_fast" or t.startswith("atom_fast."):
                found.add(t)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _floor(name):
    best = None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if name == p or (p != "atom_fast" and name.startswith(p + ".")):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    assert best is not None, f"{name} is on no floor: add it to FLOORS"
    return best[0]


def test_every_module_has_a_floor():
    for name in MODULES:
        _floor(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_from_a_higher_floor(name):
    mine = _floor(name)
    for target in GRAPH[name]:
        theirs = _floor(target)
        assert theirs <= mine, (f"{name} (floor '{FLOORS[mine][0]}') imports {target} "
                                f"(floor '{FLOORS[theirs][0]}')")


def test_no_import_circles():
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in MODULES:
                continue
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name)


def test_only_the_triton_backend_imports_the_kernels():
    users = sorted(n for n, targets in GRAPH.items()
                   if not n.startswith("atom_fast.kernels")
                   and any(t.startswith("atom_fast.kernels") for t in targets))
    assert users == ["atom_fast.backends.triton"]


def test_the_graph_is_read():
    # the checks above would pass on an empty graph: make sure the parser sees known edges
    assert "atom_fast.backends.reference" in GRAPH["atom_fast.backends.native"]
    assert "atom_fast.checks" in GRAPH["atom_fast.loss"]
    assert "atom_fast.kernels.attention" in GRAPH["atom_fast.backends.triton"]
