"""The layering of docs/architecture.md, checked on the source: each module of
python/isample imports only the layers its own layer may import, so the rule cannot rot.

Every ``import`` and ``from ... import`` counts, at module level or inside a function (a
lazy import is still a dependency), read with ``ast`` (nothing is imported).
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Set, Tuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "python" / "isample"

# Layer of each module, by the longest matching prefix of its dotted name ("isample" is the
# package's __init__ only).
LAYER_OF: Dict[str, str] = {
    "isample._core": "core",  # the compiled module (csrc/bindings.cpp)
    "isample._version": "core",
    "isample._device": "backend",
    "isample._backend": "backend",
    "isample.tree": "trees",
    "isample.scores": "policies",
    "isample.transforms": "policies",
    "isample.sampler": "samplers",
    "isample.pruning": "samplers",
    "isample": "package",  # python/isample/__init__.py: what `import isample` loads
    "isample.checkpoint": "checkpoint",
    "isample.distributed": "distributed",
    "isample.scoring": "scoring",
    "isample.integrations": "integrations",
    "isample.experiments": "runner",
    "isample.bench": "runner",
    "isample.cli": "runner",
    "isample.__main__": "runner",
}

LIBRARY = {"core", "backend", "trees", "policies", "samplers", "package"}
# What each layer may import (itself included). The runner (experiments, bench, the command)
# may import anything; no layer below it imports the runner.
MAY_IMPORT: Dict[str, Set[str]] = {
    "core": {"core"},
    "backend": {"core", "backend"},
    "trees": {"core", "backend", "trees"},
    "policies": {"core", "backend", "trees", "policies"},
    "samplers": {"core", "backend", "trees", "policies", "samplers"},
    "package": {"core", "backend", "trees", "policies", "samplers"},
    "checkpoint": {"checkpoint"},  # torch only: any layer above may save with it
    "distributed": LIBRARY | {"distributed"},
    "scoring": LIBRARY | {"scoring"},
    "integrations": LIBRARY | {"checkpoint", "distributed", "integrations"},
    "runner": set(LAYER_OF.values()),
}


def layer(module: str) -> str:
    """The layer of a dotted module name (its longest prefix in LAYER_OF)."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYER_OF:
            return LAYER_OF[prefix]
    if module == "isample":  # the package itself only: a new module must be given its layer
        return LAYER_OF[module]
    raise KeyError(f"{module} is in no layer: add it to LAYER_OF in tests/test_architecture.py and docs/architecture.md")


def modules() -> Iterator[Tuple[str, pathlib.Path]]:
    """(dotted name, path) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file() or path.with_suffix(".pyi").is_file()


def imports_of(source: str, module: str, is_package: bool = False) -> List[Tuple[int, str]]:
    """(line, dotted name) of every isample module that the source of `module` imports."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:  # `from . import _core` imports the module isample._core
                submodule = f"{origin}.{alias.name}"
                found.append((node.lineno, submodule if _exists(submodule) else origin))
    return [(line, name) for line, name in found if name == "isample" or name.startswith("isample.")]


def imports(module: str, path: pathlib.Path) -> List[Tuple[int, str]]:
    """imports_of the file of `module`."""
    return imports_of(path.read_text(encoding="utf8"), module, path.name == "__init__.py")


def test_every_module_has_a_layer():
    for module, _ in modules():
        layer(module)  # raises with the fix


def test_each_layer_imports_only_what_it_may():
    broken = []
    for module, path in modules():
        own = layer(module)
        for line, target in imports(module, path):
            if layer(target) not in MAY_IMPORT[own]:
                broken.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({own}) imports {target} ({layer(target)})")
    assert not broken, "imports against docs/architecture.md's layers:\n" + "\n".join(broken)


def test_the_library_never_imports_the_runner():
    """The direct form of the rule users feel: `import isample` (and the distributed,
    scoring and integration modules) never load the experiments, the benchmark or the CLI."""
    for module, path in modules():
        if layer(module) != "runner":
            runner = [target for _, target in imports(module, path) if layer(target) == "runner"]
            assert not runner, f"{module} imports {runner}"


def test_the_training_loop_and_the_distributed_world_do_not_import_each_other():
    """Issue 20's cycle stays broken: train.py and distributed_run.py both import the world
    abstraction (experiments/world.py) and neither imports the other; only world.make_world
    names the distributed world, lazily."""
    found = {module: {target for _, target in imports(module, path)} for module, path in modules()}
    train, distributed, world = ("isample.experiments." + name for name in ("train", "distributed_run", "world"))
    assert world in found[train] and world in found[distributed]
    assert distributed not in found[train] and train not in found[distributed]
    assert train not in found[world]


def test_a_new_module_must_be_given_a_layer():
    with pytest.raises(KeyError, match="LAYER_OF"):
        layer("isample.newmodule")
    assert layer("isample.scoring.pool") == "scoring" and layer("isample") == "package"


@pytest.mark.parametrize(
    "source, importer, allowed",
    [
        ("from ..experiments import train\n", "isample.integrations.lightning", False),
        ("from . import sampler\n", "isample.tree", False),
        ("def f():\n    import isample.scoring\n", "isample.sampler", False),  # lazy imports count
        ("from .bench import machine\n", "isample.scores", False),
        ("from . import tree, _core\n", "isample.transforms", True),
        ("from .. import distributed\n", "isample.integrations.lightning", True),
    ],
)
def test_the_check_catches_a_bad_import(source, importer, allowed):
    """Negative control: the same reading of imports flags an import across the layers."""
    targets = [name for _, name in imports_of(source, importer)]
    assert targets, source
    assert all(layer(target) in MAY_IMPORT[layer(importer)] for target in targets) is allowed, targets
