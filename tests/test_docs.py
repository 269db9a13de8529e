"""What the docs quote is true: every command, config block, config key and import in README.md and
docs/*.md is checked against the code, without running any job (seconds).

- A fenced ``yaml`` block is a job config or a fragment of one (``model:`` alone, ``metrics:``
  alone, ...): merged into a minimal config (``test_config_validation.raw``), it must pass
  ``Config.from_dict``, which checks every section, key, type, method and metric parameter.
- Every ``distributed-attr ...`` line of a ``bash`` block parses with the CLI's own parser
  (``cli.build_parser``); options named in its trailing comment (``# [--workers N]``) must be
  options of that command. Inline code that starts with ``distributed-attr`` names a command
  that exists and options it has.
- Inline code that names a config key (``run.batch_size``, ``methods.gradcam.layer``,
  ``data.mask_column: mask``) names a key the schema has: a field of the section's dataclass, a
  registered method or metric and one of its parameters (or a renamed one that still reads);
  with a value, the value validates too. What looks like a key but is a code path
  (``methods.base.Context``: an attribute of ``distributed_attr``), a file (``run.json``) or a
  module path (``model.vit.layers.11.layernorm_before``: a numbered layer) is not a key.
- A ``python`` block compiles, and the names it imports from ``distributed_attr`` (and the
  attributes it uses of ``import distributed_attr as da``) exist.
- Tables that state what the code chooses: docs/models.md's automatic CAM layers (each model
  built on the meta device, no weights, no compute) and docs/parameters.md's vocabulary (every
  registered method and metric listed under "used by" has the parameter).

A block that is deliberately not checked carries the comment ``docs-test: skip`` (with why), in
the block or on the line before it.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import io
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from distributed_attr import config as config_module
from distributed_attr.cli import build_parser
from distributed_attr.config import Config, ConfigError
from tests.test_config_validation import raw  # the minimal config the fragments are merged into

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = "docs-test: skip"
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
FILE_ENDINGS = (".py", ".md", ".json", ".yaml", ".yml", ".png", ".html", ".zarr", ".parquet", ".pt", ".pth",
                ".safetensors", ".bin", ".txt", ".csv", ".npz", ".tar")


@dataclasses.dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str
    body: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def _blocks() -> list[Block]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = text[:m.start()].rstrip("\n").rpartition("\n")[2]
            if SKIP in m.group(2) or SKIP in before:
                continue
            out.append(Block(path.relative_to(ROOT).as_posix(), line, m.group(1).lower(), m.group(2)))
    return out


def _prose(path: Path) -> str:
    """The doc without its fenced blocks (inline code is read from this)."""
    return FENCE.sub("", path.read_text())


def _inline_code() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), s) for p in DOCS for s in re.findall(r"`([^`\n]+)`", _prose(p))]


BLOCKS = _blocks()


# ------------------------------------------------------------------------------------------------
# The config schema, derived from the code
# ------------------------------------------------------------------------------------------------


def _sections() -> dict[str, typing.Any]:
    """Section name -> its type (a dataclass, or a dict type) as ``Config`` declares it."""
    return typing.get_type_hints(Config, vars(config_module))


def _registry(section: str):
    if section == "methods":
        from distributed_attr.methods import METHODS

        return METHODS
    from distributed_attr.metrics import METRICS

    return METRICS


def _param_names(section: str, name: str) -> set[str]:
    cls = _registry(section).get(name)
    params = {f.name for f in dataclasses.fields(cls.Params)}
    return params | set(getattr(cls.Params, "RENAMED", {}) or {})


def _is_code_path(span: str) -> bool:
    """``methods.base.Context``, ``methods.compute_maps``: attributes of the package, not keys."""
    parts = span.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("distributed_attr." + ".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def key_problem(span: str) -> str | None:
    """Why inline code ``span`` that names a config key does not (None: it does, or it is no key)."""
    key, sep, value = span.partition(": ")
    key = re.sub(r"\[\d+\]$", "", key.strip().rstrip(":"))
    parts = key.split(".")
    sections = _sections()
    if parts[0] not in sections or len(parts) < 2 or not all(parts):
        return None
    if key.endswith(FILE_ENDINGS) or any(c in key for c in "()<>*") or _is_code_path(key):
        return None
    if any(p.isdigit() or len(p) == 1 for p in parts[1:]):
        return None  # a module path with a layer number or a placeholder: model.vit.layers.11.ln
    section, rest = parts[0], parts[1:]
    kind = sections[section]
    if section in ("methods", "metrics"):
        if rest[0] not in _registry(section):
            return f"{section}.{rest[0]}: no such {section[:-1]} registered"
        if len(rest) > 1 and rest[1] not in _param_names(section, rest[0]):
            return f"{section}.{rest[0]} has no parameter {rest[1]!r}"
    elif section == "evaluators":
        if len(rest) > 1 and rest[1] not in {f.name for f in dataclasses.fields(config_module.ModelConfig)}:
            return f"evaluators.<name>.{rest[1]}: not a model key"
    elif dataclasses.is_dataclass(kind):
        fields = {f.name: f for f in dataclasses.fields(kind)}
        if rest[0] not in fields:
            return f"{section}.{rest[0]}: not a key of {section} (keys: {sorted(fields)})"
        if len(rest) > 1 and typing.get_origin(typing.get_type_hints(kind)[rest[0]]) is not dict:
            return f"{key}: {section}.{rest[0]} has no sub-keys"
    else:
        return None  # store, storage_options (free mapping)
    if sep and value.strip():
        return _value_problem(section, rest, yaml.safe_load(value), key)
    return None


def _value_problem(section: str, rest: list[str], value, key: str) -> str | None:
    """Whether ``value`` is one the key accepts, by the key's own type (as the config reads it;
    requirements that involve other keys, such as a kind that needs weights, are not this key's)."""
    from distributed_attr.registry import RegistryError, _coerce

    if section in ("methods", "metrics"):
        if len(rest) < 2:
            return None
        cls = _registry(section).get(rest[0]).Params
        name = (getattr(cls, "RENAMED", {}) or {}).get(rest[1], (rest[1],))[0]
    elif dataclasses.is_dataclass(_sections()[section]) and len(rest) == 1:
        cls, name = _sections()[section], rest[0]
    else:
        return None
    try:
        _coerce(value, typing.get_type_hints(cls)[name], key)
    except RegistryError as exc:
        return str(exc)
    return None


def _nested(key: str, value) -> dict:
    out: typing.Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _merge(base: dict, fragment: dict) -> dict:
    out = dict(base)
    for k, v in fragment.items():
        out[k] = {**out[k], **v} if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def config_problem(fragment: dict) -> str | None:
    """``Config.from_dict`` on the fragment merged into the minimal config; its error, or None."""
    if "methods" in fragment and not fragment["methods"]:
        return "methods: empty"
    try:
        Config.from_dict(_merge(raw(), fragment))
    except ConfigError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------------------------
# YAML blocks
# ------------------------------------------------------------------------------------------------


def test_the_docs_have_the_blocks_this_file_checks():
    langs = {b.lang for b in BLOCKS}
    assert {"yaml", "bash", "python"} <= langs
    assert sum(b.lang == "yaml" for b in BLOCKS) >= 8


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("yaml", "yml")], ids=lambda b: b.where)
def test_every_yaml_block_is_a_valid_config_or_fragment(block):
    doc = yaml.safe_load(block.body)
    assert isinstance(doc, dict), f"{block.where}: a YAML block that is not a mapping (mark it '{SKIP}')"
    unknown = sorted(set(doc) - set(_sections()))
    assert not unknown, (f"{block.where}: top-level keys {unknown} are not config sections "
                         f"({sorted(_sections())}); if the block is not a job config, mark it '{SKIP}'")
    problem = config_problem(doc)
    assert problem is None, f"{block.where}: {problem}"


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------


def _command_lines(body: str) -> list[tuple[list[str], str]]:
    """``(argv after 'distributed-attr', trailing comment)`` of every distributed-attr line."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        code, _, comment = line.partition(" #")
        if line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(code, comments=True)
        except ValueError:
            continue
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]  # VAR=value before the command
        if words and words[0] == "distributed-attr":
            out.append((words[1:], comment))
    return out


def _subparser(argv: list[str]):
    """The deepest (sub)parser the leading words of ``argv`` select, and the words it takes."""
    parser = build_parser()
    rest = list(argv)
    while rest:
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs or rest[0] not in subs[0].choices:
            break
        parser = subs[0].choices[rest.pop(0)]
    return parser, rest


def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def _parse(argv: list[str]) -> str | None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            return err.getvalue().strip().splitlines()[-1] if exc.code else None
    return None


COMMANDS = [(b, argv, comment) for b in BLOCKS if b.lang in ("bash", "sh", "shell", "console")
            for argv, comment in _command_lines(b.body)]


def test_the_docs_quote_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("block,argv,comment", COMMANDS, ids=[f"{b.where} {' '.join(a)}" for b, a, _ in COMMANDS])
def test_every_command_in_a_code_block_parses(block, argv, comment):
    problem = _parse(argv)
    assert problem is None, f"{block.where}: distributed-attr {' '.join(argv)}: {problem}"
    parser, _ = _subparser(argv)
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", comment))
    assert named <= _options(parser), (f"{block.where}: the comment names options "
                                       f"{sorted(named - _options(parser))} that '{parser.prog}' does not have")


INLINE_COMMANDS = [(doc, s) for doc, s in _inline_code() if s.startswith("distributed-attr ")]


@pytest.mark.parametrize("doc,span", INLINE_COMMANDS, ids=[f"{d}: {s}" for d, s in INLINE_COMMANDS])
def test_every_inline_command_names_a_command_and_its_options(doc, span):
    argv = shlex.split(span)[1:]
    parser, rest = _subparser(argv)
    assert parser.prog != "distributed-attr" or not argv or argv[0].startswith("-"), \
        f"{doc}: `{span}`: no command {argv[0]!r}"
    unknown = [w.split("=")[0] for w in rest if w.startswith("--") and w.split("=")[0] not in _options(parser)]
    assert not unknown, f"{doc}: `{span}`: '{parser.prog}' has no option {unknown}"


# ------------------------------------------------------------------------------------------------
# Config keys in inline code
# ------------------------------------------------------------------------------------------------

KEY_SPANS = sorted({(d, s) for d, s in _inline_code() if s.split(".")[0] in _sections() and "." in s})


def test_the_docs_name_config_keys():
    assert len(KEY_SPANS) >= 30


@pytest.mark.parametrize("doc,span", KEY_SPANS, ids=[f"{d}: {s}" for d, s in KEY_SPANS])
def test_every_config_key_in_inline_code_exists(doc, span):
    problem = key_problem(span)
    assert problem is None, (f"{doc}: `{span}`: {problem} (if it is not meant as a config key, write it so "
                             "that it does not start with a config section: \"the model's `pretrained_cfg`\")")


def test_the_key_check_catches_what_it_should():
    """The check itself: misspelt keys, unknown methods, parameters and values fail; code paths,
    files and layer paths are not keys."""
    assert key_problem("run.batch_size") is None and key_problem("methods.gradcam.layer") is None
    assert key_problem("run.decode_workers: 0") is None and key_problem("metrics.avg_sensitivity.nr_samples") is None
    assert "not a key of run" in key_problem("run.batchsize")
    assert "no such method" in key_problem("methods.grad_cam")
    assert "no parameter 'layers'" in key_problem("methods.gradcam.layers")
    assert "run.autocast" in key_problem("run.autocast: bfloat8")
    for not_a_key in ("methods.base.Context", "methods.compute_maps", "run.json", "model.vit.layers.11.layernorm_before",
                      "model.named_modules()", "spectra.png"):
        assert key_problem(not_a_key) is None, not_a_key


# ------------------------------------------------------------------------------------------------
# Python blocks
# ------------------------------------------------------------------------------------------------

PYTHON = [b for b in BLOCKS if b.lang == "python"]


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.where)
def test_every_python_block_compiles_and_imports_what_exists(block):
    tree = ast.parse(block.body, filename=block.where)
    # a worked example's own new module ("### The file: `distributed_attr/methods/grid_ablation.py`")
    examples = {m.replace("/", ".")[:-3] for m in re.findall(r"`(distributed_attr/[\w/]+\.py)`", (ROOT / block.doc).read_text())}
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "distributed_attr":
            if node.module in examples and not _submodule(*node.module.rsplit(".", 1)):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or _submodule(node.module, alias.name), \
                    f"{block.where}: from {node.module} import {alias.name}: no such name"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "distributed_attr":
                    aliases[alias.asname or alias.name] = importlib.import_module(alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            assert hasattr(aliases[node.value.id], node.attr), f"{block.where}: {node.value.id}.{node.attr}: no such name"


def _submodule(module: str, name: str) -> bool:
    try:
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# Tables that say what the code chooses
# ------------------------------------------------------------------------------------------------


def _table_rows(doc: str, header: str) -> list[list[str]]:
    """The body rows of the table whose header row contains ``header``, as cell lists."""
    lines = (ROOT / doc).read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|") and header in line), None)
    assert start is not None, f"{doc}: no table with a '{header}' column"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _build_on_meta(kind: str, name: str):
    import torch

    with torch.device("meta"):
        if kind == "zoo":
            from distributed_attr import zoo

            return zoo.build(name).eval(), torch.empty(1, 1, 32, 32)
        if kind == "torchvision":
            import torchvision

            return torchvision.models.get_model(name, weights=None).eval(), torch.empty(1, 3, 224, 224)
        if kind == "timm":
            timm = pytest.importorskip("timm")
            return timm.create_model(name, pretrained=False).eval(), torch.empty(1, 3, 224, 224)
        transformers = pytest.importorskip("transformers")
        from distributed_attr.io.models import LogitsOf

        model = transformers.ViTForImageClassification(transformers.ViTConfig(num_hidden_layers=12))
        return LogitsOf(model).eval(), torch.empty(1, 3, 224, 224)


def test_the_automatic_cam_layers_in_models_md_are_what_the_code_picks():
    """docs/models.md's table, row by row: the model built (meta device: shapes only, no weights,
    no compute) and ``resolve_layer`` asked, as the pipeline asks it."""
    from distributed_attr.methods import resolve_layer

    rows = _table_rows("docs/models.md", "automatic CAM layer")
    assert len(rows) >= 8
    for model_cell, layer_cell in rows:
        kind = model_cell.split()[0].lower() if not model_cell.startswith("Hugging Face") else "huggingface"
        name = re.search(r"`([^`]+)`", model_cell)
        model, x = _build_on_meta(kind, name.group(1) if name else "")
        picked = resolve_layer(model, None, x)
        chosen = next(n for n, m in model.named_modules() if m is picked)
        stated = re.findall(r"`([^`]+)`", layer_cell)
        assert chosen in stated, f"docs/models.md: {model_cell}: the docs say {stated}, the code picks {chosen!r}"


def test_the_parameter_vocabulary_names_parameters_the_listed_classes_have():
    """docs/parameters.md: each parameter of the vocabulary table exists in every registered
    method and metric its "used by" cell names."""
    from distributed_attr.methods import METHODS
    from distributed_attr.metrics import METRICS

    rows = _table_rows("docs/parameters.md", "used by")
    assert len(rows) >= 10
    checked = 0
    for row in rows:
        params = re.findall(r"`([a-z_]+)`", row[0])
        # "deletion, forgrad_protocol (`deletion_baseline`, `insertion_baseline`)": the names a class uses instead
        for name, own in re.findall(r"([a-z][a-z0-9_]+)(?:\s*\(([^)]*)\))?", row[-1]):
            names = re.findall(r"`([a-z_]+)`", own) or params
            for section, registry in (("methods", METHODS), ("metrics", METRICS)):
                if name in registry:
                    missing = [p for p in names if p not in _param_names(section, name)]
                    assert not missing, f"docs/parameters.md: {name} has no parameter {missing}"
                    checked += 1
    assert checked >= 30
