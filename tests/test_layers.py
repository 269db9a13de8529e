"""The layering rule: methods, metrics and spectral code are pure tensor functions, so none of
their modules may import the store, the aggregation, the evaluation job, the runner, the pipeline,
the command line, the demo, the report, the inspection, the Ray session or the configuration.

The imports are read from the source with ``ast`` (nothing is imported), including imports inside
functions and relative ones (``from ..io import x``)."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = "distributed_attr"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
#: the lower layers, as sub-packages of ``distributed_attr``
LOWER = ["methods", "metrics", "spectral"]
#: what the lower layers must not import (each one with everything under it)
FORBIDDEN = [
    f"{PACKAGE}.{name}"
    for name in [
        "io", "aggregate", "evaluation", "runner", "pipeline", "cli", "demo", "report", "inspect",
        "ray_session", "config", "zoo", "data", "benchmark",
    ]
]
#: the rest of the maths layer: modules that sit beside (or below) methods, metrics and spectral,
#: and what each may import of the package (the maths layer, nothing that reads or writes files)
MATHS_MODULES = ["commons.py", "registry.py", "architectures.py", "aggregate/stats.py", "aggregate/spectra.py",
                 "aggregate/results.py"]
MATHS = [f"{PACKAGE}.{name}" for name in (
    "commons", "registry", "architectures", "methods", "metrics", "spectral", "aggregate.stats",
    "aggregate.spectra", "aggregate.results")]


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """The dotted module name of ``path`` under the package directory ``root``, and whether it
    is a package's ``__init__``."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    is_init = parts[-1] == "__init__"
    if is_init:
        parts = parts[:-1]
    return ".".join(parts), is_init


def imported_names(tree: ast.AST, module: str, is_init: bool) -> list[tuple[int, str, str]]:
    """``(line, absolute name, source text)`` for every import in the module. ``from a import b``
    yields both ``a`` and ``a.b`` (``b`` may be a sub-module)."""
    package = module if is_init else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((node.lineno, alias.name, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    base = ""  # beyond the top package: cannot be one of ours
                else:
                    base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = ".".join(p for p in (base, node.module) if p)
            else:
                base = node.module or ""
            text = ast.unparse(node)
            out.append((node.lineno, base, text))
            for alias in node.names:
                if alias.name != "*":
                    out.append((node.lineno, f"{base}.{alias.name}", text))
    return out


def is_forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def violations(root: Path) -> list[str]:
    """One line per forbidden import in the lower layers under package directory ``root``."""
    found = []
    for sub in LOWER:
        for path in sorted((root / sub).rglob("*.py")):
            module, is_init = module_name(path, root)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            seen = set()
            for line, name, text in imported_names(tree, module, is_init):
                if is_forbidden(name) and (line, text) not in seen:
                    seen.add((line, text))
                    found.append(f"{module} ({path.relative_to(root.parent)}:{line}) imports {name}: {text}")
    return found


def test_lower_layers_exist():
    for sub in LOWER:
        assert (ROOT / sub / "__init__.py").is_file(), sub
        assert len(list((ROOT / sub).rglob("*.py"))) >= 2, sub


def test_methods_metrics_and_spectral_import_no_higher_layer():
    found = violations(ROOT)
    assert not found, "lower layers import higher ones:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "where, source, names",
    [
        ("methods/bad.py", "from ..io import store\n", ["distributed_attr.io"]),
        ("metrics/bad.py", "import os\n\n\ndef f():\n    from ..config import load\n", ["distributed_attr.config"]),
        ("spectral/bad.py", "from .. import runner, zoo\n", ["distributed_attr.runner"]),
        ("methods/__init__.py", "from ..aggregate.stats import x\n", ["distributed_attr.aggregate"]),
        ("metrics/bad.py", "import distributed_attr.evaluation.run as r\n", ["distributed_attr.evaluation"]),
        ("spectral/bad.py", "from distributed_attr import ray_session\n", ["distributed_attr.ray_session"]),
        ("methods/sub/deep.py", "from ...pipeline import run\n", ["distributed_attr.pipeline"]),
    ],
)
def test_the_check_catches_a_violation(tmp_path, where, source, names):
    """The rule run on a copy of the lower layers with one violating module added."""
    copy = tmp_path / PACKAGE
    for sub in LOWER:
        shutil.copytree(ROOT / sub, copy / sub, ignore=shutil.ignore_patterns("__pycache__"))
    bad = copy / where
    bad.parent.mkdir(parents=True, exist_ok=True)
    with bad.open("a", encoding="utf-8") as f:
        f.write("\n" + source)
    found = violations(copy)
    assert len(found) == 1, found
    (line,) = found
    module = module_name(bad, copy)[0]
    assert line.startswith(module + " ") and any(n in line for n in names), line
    short = names[0].rpartition(".")[2]
    lineno = next(i for i, s in enumerate(bad.read_text().splitlines(), 1) if short in s and "import" in s)
    assert f":{lineno}) imports {names[0]}" in line, line


def test_allowed_imports_are_not_flagged(tmp_path):
    copy = tmp_path / PACKAGE
    (copy / "methods").mkdir(parents=True)
    (copy / "metrics").mkdir()
    (copy / "spectral").mkdir()
    (copy / "methods" / "ok.py").write_text(
        "from ..registry import Registry\nfrom .base import Method\nimport io\nfrom ..iox import y\n"
        "from ..methods.base import run_in_chunks\nimport inspect\n"
    )
    assert violations(copy) == []


def test_commons_sits_below_methods_and_metrics():
    """``commons`` is what methods and metrics share: it may import neither, nor anything above."""
    path = ROOT / "commons.py"
    module, is_init = module_name(path, ROOT)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    ours = [(line, name) for line, name, _ in imported_names(tree, module, is_init)
            if name.startswith(PACKAGE + ".") or name == PACKAGE]
    assert not ours, f"commons imports {ours}"


def test_the_subpackages_keep_their_names_and_the_package_imports_no_torch():
    """``distributed_attr.methods`` was both the subpackage and a function (``import
    distributed_attr.methods as m`` gave the function); importing the package or its config
    imported torch (seconds) before any YAML was parsed."""
    import subprocess
    import sys

    code = ("import sys, types, distributed_attr, distributed_attr.config; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "import distributed_attr.methods as m, distributed_attr.metrics as k; "
            "assert isinstance(m, types.ModuleType) and isinstance(k, types.ModuleType); "
            "assert 'lrp' in distributed_attr.list_methods() and 'deletion' in distributed_attr.list_metrics()")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("relative", MATHS_MODULES)
def test_the_rest_of_the_maths_layer_imports_only_maths(relative):
    """The batch context, the registry, the bundled architectures and the aggregation's mergeable
    statistics are pure too: they import nothing that opens files, the store, Ray or the config
    (the zoo's training and weight cache are ``zoo``'s, apart from its ``architectures``)."""
    path = ROOT / relative
    module, is_init = module_name(path, ROOT)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    outside = [(line, name) for line, name, _ in imported_names(tree, module, is_init)
               if name.startswith(PACKAGE + ".") and not any(name == m or name.startswith(m + ".") for m in MATHS)]
    assert not outside, f"{relative} imports {outside}"
