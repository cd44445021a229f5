"""Dependencies inside the package point one way: no module imports one that imports it back,
directly or through others. An import inside a function counts (it runs when the function does,
and still makes the two modules depend on each other); one under `if TYPE_CHECKING:` does not."""

from __future__ import annotations

from package_imports import import_graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of modules that reach each other (Tarjan's strongly connected components, more
    than one module), as one cycle through that group that starts and ends at its first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = {stack.pop()}
            while v not in group:
                group.add(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_through(graph, g) for g in groups)


def _through(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest way from the group's first module back to itself, inside the group."""
    start = min(group)
    came: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came[path[-1]])
                return path[::-1] + [start]
            if w not in came:
                came[w] = v
                todo.append(w)
    raise AssertionError(f"no cycle through {sorted(group)}")


def test_cycles_are_found_in_a_made_up_graph():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": set(), "x": {"y"}, "y": {"x"}}) == [["a", "b", "a"],
                                                                                         ["x", "y", "x"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_holds_imports_at_the_top_and_inside_functions_but_not_for_type_checking():
    graph = import_graph()
    assert "ckptsync.stores.directory" in graph["ckptsync.backup"]                  # at the top
    assert "ckptsync.backup" in graph["ckptsync.cli.cmd_backup"]         # inside the command function
    assert "ckptsync.multi" not in graph["ckptsync.cli.many"]            # under TYPE_CHECKING only
    assert "ckptsync.server" not in graph["ckptsync.config"]


def test_no_import_cycle_inside_the_package():
    found = cycles(import_graph())
    assert not found, "import cycles (each: a way round one):\n" + "\n".join(" -> ".join(c) for c in found)
