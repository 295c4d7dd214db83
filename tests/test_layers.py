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


# The data's path, bottom to top: a module imports only from its own layer or those below it.
LAYERS = ["lazyfp8.errors", "lazyfp8.storage", "lazyfp8.formats", "lazyfp8.kernels"]


def layer(module: str) -> int:
    for rank, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return len(LAYERS)  # the top: view, lazy values, loading, writing, key mapping, CLI


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, targets in graph.items() for t in targets if layer(t) > layer(m))


def test_the_layer_checker_finds_an_upward_import():
    assert upward_imports({"lazyfp8.storage.reader": {"lazyfp8.formats.schemes"}}) == [
        ("lazyfp8.storage.reader", "lazyfp8.formats.schemes")
    ]
    assert upward_imports({"lazyfp8.view": {"lazyfp8.kernels.source", "lazyfp8.storage.reader"}}) == []


def test_each_layer_imports_only_the_layers_below_it():
    graph = import_graph()
    assert {"lazyfp8.storage.reader", "lazyfp8.formats.schemes", "lazyfp8.kernels.jit"} <= set(graph)
    assert upward_imports(graph) == []
