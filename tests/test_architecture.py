"""The floors of docs/architecture.md, checked on the source: every import of a tunery module (at
module level or inside a function) goes to the same floor or one below, no module imports itself
back through others, and no API under server/ imports another API."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: Lowest first. A module may import modules of its own floor or of lower ones.
FLOORS = [
    ["tunery.version", "tunery.errors", "tunery.spec", "tunery.chat_templates", "tunery.process"],
    ["tunery.artifacts"],
    ["tunery.settings"],
    ["tunery.data"],
    ["tunery.models"],
    ["tunery.infer", "tunery.export"],
    ["tunery.eval", "tunery.graders"],
    ["tunery.train", "tunery.samples", "tunery.demo"],
    ["tunery.store"],
    ["tunery.service"],
    ["tunery.worker"],
    ["tunery.server", "tunery.client"],
    ["tunery.cli", "tunery"],
]
APIS = ["tunery.server.replicate", "tunery.server.openai", "tunery.server.azure"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "tunery").rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The tunery modules `name` imports anywhere in its file."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {t for t in targets if t in MODULES and t != name}
    return found


def _floor(name: str) -> int:
    best = None
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (level, len(prefix))
    assert best is not None, f"{name} is on no floor: add it to FLOORS and docs/architecture.md"
    return best[0]


GRAPH = {name: _imports(name) for name in MODULES}


def test_every_import_goes_down_or_across():
    wrong = [f"{a} (floor {_floor(a)}) imports {b} (floor {_floor(b)})"
             for a, targets in GRAPH.items() for b in targets if _floor(b) > _floor(a)]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circle():
    # Package __init__ modules re-export their own package's modules: edges into a package's own
    # children from its __init__ are not circles of the code.
    def edges(a):
        return {b for b in GRAPH[a] if not b.startswith(a + ".")}

    state: dict[str, int] = {}
    circles = []

    def visit(node, path):
        state[node] = 1
        for nxt in edges(node):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(circles)


def test_no_api_imports_another():
    wrong = [f"{a} imports {b}" for a, targets in GRAPH.items() for b in targets
             for api in APIS if a.startswith(api) and any(b.startswith(o) for o in APIS if o != api)]
    assert not wrong, "\n".join(wrong)


def test_the_service_imports_nothing_from_the_server():
    wrong = [f"{a} imports {b}" for a, targets in GRAPH.items() if a.startswith("tunery.service")
             for b in targets if b.startswith("tunery.server")]
    assert not wrong, "\n".join(wrong)


def test_the_check_finds_a_back_arrow():
    """The floors test is real: a lower floor importing a higher one is reported."""
    assert _floor("tunery.store.store") < _floor("tunery.server.app")
    assert _floor("tunery.server.replicate.shapes") > _floor("tunery.store.outbox")

