"""The package's layout holds: no import cycles in gateway/, and what serves reaches nothing of the
tools (gateway/tools) or of build/launch/package (gateway/ops).

Every import counts, at module level, inside functions (lazy) and under TYPE_CHECKING: a cycle
through a lazy import is still two modules that each need the other. The graph is read from the
source with ast, so the test needs nothing installed beyond the standard library.
"""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "gateway"
TOOLS = ("gateway.tools", "gateway.ops")  # the two parts that are not the server
DISPATCHER = "gateway.cli"  # `gateway` itself: loads each subcommand's module by name (importlib)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def imports(name: str) -> set[str]:
    """The gateway modules ``name`` imports (``from gateway.x import y``: gateway.x.y when that is
    a module, else gateway.x)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in MODULES:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
            found |= subs or {node.module}
            if len(subs) < len(node.names):  # names that are not modules come from the module itself
                found.add(node.module)
    return found - {name}


GRAPH = {name: imports(name) for name in MODULES}


def cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def reach(start: str) -> dict[str, str]:
    """Every module ``start`` reaches, each with the module that imports it on the way."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop()
        for w in GRAPH[v]:
            if w not in seen and w != start:
                seen[w] = v
                todo.append(w)
    return seen


def is_tool(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TOOLS)


def test_the_graph_is_read():
    """The reader sees real edges (guards the two tests below against an empty graph)."""
    assert "gateway.service" in GRAPH["gateway.app"]
    assert "gateway.tasks" in GRAPH["gateway.service"]
    assert "gateway.tools.batch.results" in GRAPH["gateway.tools.batch.http_engine"]
    assert len(MODULES) > 50


def test_no_import_cycles_in_the_package():
    assert cycles() == []


def test_what_serves_reaches_nothing_of_the_tools_or_of_build_launch_package():
    serving = [m for m in MODULES if not is_tool(m) and m != DISPATCHER]
    entry_points = {"gateway.app", "gateway.serve", "gateway.serverless.lambda_handler", "gateway.v2.grpc_server"}
    assert entry_points <= set(serving)
    leaks = {}
    for start in serving:
        for reached, via in reach(start).items():
            if is_tool(reached):
                leaks[start] = f"{via} imports {reached}"
    assert leaks == {}


def test_the_lambda_bundle_ships_exactly_what_its_handler_reaches():
    """The bundle's allowlist (gateway.ops.lambda_package.SHIPPED) holds every module the Lambda
    handler can import, and nothing of the tools or of build/launch/package."""
    from gateway.ops.lambda_package import SHIPPED, shipped_modules

    needed = {"gateway.serverless.lambda_handler", *reach("gateway.serverless.lambda_handler")}
    shipped = set(shipped_modules(PACKAGE))
    assert needed - {"gateway"} <= shipped, sorted(needed - shipped)
    assert not any(is_tool(m) for m in shipped)
    assert "tools" not in SHIPPED and "ops" not in SHIPPED
