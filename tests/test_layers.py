"""The package is layered: no module imports, directly or through others, a module that imports
it back. Function-level imports and imports under ``TYPE_CHECKING`` count: a cycle hidden from
the interpreter is still a cycle in the design."""

import ast
import pathlib

import lazyfp8

PACKAGE = pathlib.Path(lazyfp8.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (``lazyfp8.__init__`` left out: it only
    re-exports)."""
    modules = {".".join(("lazyfp8", *f.relative_to(PACKAGE).with_suffix("").parts)): f for f in PACKAGE.rglob("*.py")}
    modules = {m.removesuffix(".__init__"): f for m, f in modules.items()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    root = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{root}.{base}" if base else root
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t not in (name, "lazyfp8")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_the_checker_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "lazyfp8.view" in graph and "lazyfp8.lazy" in graph["lazyfp8.view"]
    assert find_cycles(graph) == []
