"""The package's shape: no import circle, imports run one way down the layers, and the size bars hold.

Every import in ``src/covidscan`` is read (at module top and inside functions, ``TYPE_CHECKING`` blocks
included), so a lazy import cannot hide a step up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "covidscan"

#: lowest first; a module may import its own layer and the ones below it, never one above
LAYERS = [
    ("base", ("errors", "labels", "results", "runtime", "metrics", "provenance")),
    ("models", ("models",)),
    ("config", ("config",)),
    ("data", ("data",)),
    ("checkpoint", ("checkpoint", "appearance", "compact")),
    ("predict", ("predict",)),
    (
        "use",
        (
            "inference",
            "evaluation",
            "explain",
            "adapt",
            "export",
            "study",
            "study_files",
            "ensemble",
            "probe",
            "card",
            "summary",
            "reports",
            "zoo",
        ),
    ),  # fmt: skip
    ("training", ("training",)),
    ("top", ("experiments", "serve")),
    ("cli", ("cli", "__main__")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(mod: str) -> int:
    if mod == "covidscan":
        return -1  # the package itself: lazy names only
    first = mod.split(".")[1]
    for k, (_, names) in enumerate(LAYERS):
        if first in names:
            return k
    raise AssertionError(f"{mod}: in no layer; add it to tests/test_layers.py LAYERS")


def imports() -> dict[str, set[str]]:
    known = {module_name(p) for p in SRC.rglob("*.py")}
    graph = {}
    for path in SRC.rglob("*.py"):
        me = module_name(path)
        out = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for n in names:
                while n and n not in known:
                    n = n.rsplit(".", 1)[0] if "." in n else ""
                if n and n != me and n != "covidscan":
                    out.add(n)
        graph[me] = out
    return graph


def test_no_import_circle():
    graph = imports()
    index, low, stack, on, groups, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert groups == [], f"import circles: {groups}"


def test_imports_run_down_the_layers():
    ups = []
    for mod, targets in imports().items():
        for t in targets:
            if layer_of(t) > layer_of(mod):
                ups.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    assert ups == [], "imports up the layers:\n" + "\n".join(sorted(ups))


def test_use_never_imports_training_and_data_imports_no_classifier():
    graph = imports()
    for mod, targets in graph.items():
        if not mod.startswith(("covidscan.training", "covidscan.experiments", "covidscan.cli")):
            assert not any(t.startswith("covidscan.training") for t in targets), mod
        if mod.startswith("covidscan.data"):
            assert not any(t.startswith(("covidscan.models", "covidscan.checkpoint")) for t in targets), mod
        if not mod.startswith(("covidscan.cli", "covidscan.__main__")):  # nothing imports the CLI
            assert not any(t.startswith("covidscan.cli") for t in targets), mod


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_size_bars(path):
    """No module over 500 lines; no function over 80 lines outside argparse tables (``register``)."""
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") <= 500, f"{path.name}: {text.count(chr(10))} lines"
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(ast.parse(text))
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name != "register" and n.end_lineno - n.lineno + 1 > 80
    ]
    assert long == [], f"{path.name}: {long}"


def test_a_step_up_is_caught(tmp_path, monkeypatch):
    """The layer test can fail: a data module importing the training wing is reported."""
    fake = {"covidscan.data.records": {"covidscan.training.loop"}}
    monkeypatch.setattr(__import__(__name__), "imports", lambda: fake, raising=False)
    ups = [f"{m} -> {t}" for m, ts in fake.items() for t in ts if layer_of(t) > layer_of(m)]
    assert ups == ["covidscan.data.records -> covidscan.training.loop"]
