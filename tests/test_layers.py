"""The house's layers: imports flow one way (config -> sources -> poller ->
state -> readers -> runtime -> command line), with no back-edge. A new module
must be given its layer here, so the picture stays true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

LAYERS: list[tuple[str, ...]] = [
    # The vocabulary and tools everything may use.
    ("exporter", "exporter.model", "exporter.redact", "exporter.reads", "exporter.limits",
     "exporter.hup", "exporter.logs", "exporter.sharding", "exporter.simulator"),
    # The config's building blocks.
    ("exporter.config",),
    # One module per upstream API, then the list of them.
    ("exporter.sources",),
    ("exporter.sources.registry",),
    # Reading a config file needs the list of source types.
    ("exporter.config.loader",),
    # The one in-memory truth.
    ("exporter.import_index", "exporter.state"),
    # What writes it and keeps it.
    ("exporter.poller", "exporter.storage", "exporter.tracking", "exporter.discovery"),
    # Readers of the state (and persistence, which reads changes out of it).
    ("exporter.persistence", "exporter.metrics", "exporter.exposition", "exporter.pages",
     "exporter.render_process", "exporter.api", "exporter.webconfig", "exporter.web"),
    ("exporter.registration",),
    # Wiring, and the programs on top.
    ("exporter.runtime", "exporter.demo", "exporter.client"),
    ("exporter.cli", "exporter.__main__"),
]  # fmt: skip


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names ``module``."""
    best, found = -1, -1
    for number, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), number
    return found


def modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "exporter").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path) -> set[str]:
    """Modules of this package imported at run time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    checking_only = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for statement in branch.body
        for node in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in checking_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("exporter"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("exporter"))
    return found


def test_every_module_has_a_layer() -> None:
    assert [name for name in modules() if layer_of(name) < 0] == []


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_flow_one_way(module: str) -> None:
    own = layer_of(module)
    upward = {
        imported: LAYERS[layer_of(imported)]
        for imported in imports_of(modules()[module])
        if layer_of(imported) > own
    }
    assert upward == {}, f"{module} (layer {LAYERS[own]}) reaches up to {upward}"


def test_the_simulator_is_a_fake_of_the_vendors_and_knows_no_exporter_module() -> None:
    for name, path in modules().items():
        if name.startswith("exporter.simulator"):
            assert {m for m in imports_of(path) if not m.startswith("exporter.simulator")} == set()
