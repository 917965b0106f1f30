"""The package's layers, checked from the source: every `tfx_jax/**/*.py` is parsed with `ast`.

Rules (an import of `tfx_jax.a.b` breaks a rule of its importer's layer; `from tfx_jax.a import b`
counts as importing `tfx_jax.a.b`, relative imports are resolved first):

  data       tfx_jax/data/** imports nothing from tfx_jax.models, .train, .generate, .export,
             .cli, .artifacts, .stages, .demo (data knows records and batches, not the model, the
             trainer or the stages that use it).
  models     tfx_jax/models/** imports only tfx_jax.models.* and tfx_jax.layout: nothing from
             .data, .train, .generate, .export, .cli, .artifacts, .stages, .demo, .diffusion, nor
             the top-level config (a model section lives in tfx_jax/models/config.py).
  config     tfx_jax/config.py imports only the section configs: tfx_jax.models.config and
             tfx_jax.data.config, the data section's checks (tfx_jax.data.checks) and the
             diffusion modes (tfx_jax.diffusion.modes): never model or data code otherwise.
  leaves     tfx_jax/data/config.py imports nothing of the project (models/config.py imports
             only the models' own registries): the config sits above its sections, no circle
             through a section (the cycle check below proves it for the whole package).
  generate   tfx_jax/generate/** and tfx_jax/export.py import nothing from tfx_jax.train
             (inference never needs the trainer).
  diffusion  tfx_jax/diffusion/** imports only tfx_jax.diffusion.* and tfx_jax.layout (pure
             functions of arrays and schedules).
  eval       tfx_jax/eval/** imports nothing from tfx_jax.train, .cli, .stages, .demo (training's
             evaluators call the eval package, never the other way; the train step's loss and
             the demo's targets are given to it as parameters).
  embedded   nothing outside tfx_jax/data/ imports tfx_jax.data.embedded (the shapes world):
             code outside data asks the source (`Source.judge`, `Source.describe`), so a new
             judged dataset is one source module.
  top-level  every project import (`tfx_jax...`, also `importlib.import_module("tfx_jax...")`)
             is at module level, not inside a function or method, so the dependency graph is
             what the module headers say; imports under `if TYPE_CHECKING:` are exempt from this
             rule (not from the layer rules above). Third-party lazy imports are allowed.

A failure lists `file:line: <the import>  [rule]: <what the rule says>` for every violation.

Config slices (`test_components_take_their_section`): models and diffusion code take their own
section, never the run's `Config`; data code takes `DataConfig` or the `RunConfig` protocol, never
`Config`; a private helper that reads one section of a run config it does not pass on takes
that section.

Besides the rules, the modules' import graph (every project import, TYPE_CHECKING ones and
function-local ones included; an import names the module it reaches, not the packages above it)
has no cycle: `test_no_import_cycles` names each cycle it finds, module by module, except those
in `KNOWN_CYCLES_TO_REMOVE`.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "tfx_jax"


@dataclasses.dataclass(frozen=True)
class Import:
    file: str  # path relative to the repo
    line: int
    text: str  # the statement as written (unparsed)
    importer: str  # dotted module of the file
    target: str  # the dotted project name imported
    in_function: bool
    type_checking: bool


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    if not level:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(source: str, file: str, importer: str, is_package: bool = False) -> list[Import]:
    """Every project import in `source`, with where it sits (function body, TYPE_CHECKING)."""
    found: list[Import] = []

    def add(node: ast.AST, target: str, in_function: bool, type_checking: bool) -> None:
        if target == "tfx_jax" or target.startswith("tfx_jax."):
            text = ast.unparse(node)
            found.append(
                Import(file, node.lineno, text, importer, target, in_function, type_checking)
            )

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, in_function, type_checking)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(importer, is_package, node.module, node.level)
            for alias in node.names:
                add(
                    node,
                    f"{module}.{alias.name}" if alias.name != "*" else module,
                    in_function,
                    type_checking,
                )
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node, node.args[0].value, in_function, type_checking)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, in_function, True)
            for child in node.orelse:
                visit(child, in_function, type_checking)
            return
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_checking)

    visit(ast.parse(source, filename=file), False, False)
    return found


def project_imports() -> list[Import]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        out += imports_of(
            path.read_text(),
            str(path.relative_to(REPO)),
            _module_name(path),
            is_package=path.name == "__init__.py",
        )
    return out


# ----------------------------------------------------------------------------- rules


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _p(*names: str) -> tuple[str, ...]:
    return tuple(f"tfx_jax.{n}" for n in names)


APP = ("train", "generate", "export", "cli", "artifacts", "stages", "demo")


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    says: str
    applies: object  # (Import) -> bool: the rule governs this importer
    allowed: object  # (Import) -> bool: this import keeps the rule

    def broken_by(self, imp: Import) -> bool:
        return self.applies(imp) and not self.allowed(imp)


RULES = [
    Rule(
        "data",
        "tfx_jax/data/** imports nothing from tfx_jax.models, .train, .generate, .export, .cli, "
        ".artifacts, .stages, .demo",
        lambda i: _under(i.importer, "tfx_jax.data"),
        lambda i: not _under(i.target, *_p("models", *APP)),
    ),
    Rule(
        "models",
        "tfx_jax/models/** imports only tfx_jax.models.* and tfx_jax.layout",
        lambda i: _under(i.importer, "tfx_jax.models"),
        lambda i: _under(i.target, *_p("models", "layout")),
    ),
    Rule(
        "config",
        "tfx_jax/config.py imports only the section configs (tfx_jax.models.config, "
        "tfx_jax.data.config), the data section's checks (tfx_jax.data.checks) and the "
        "diffusion modes it validates (tfx_jax.diffusion.modes: pure functions)",
        lambda i: i.importer == "tfx_jax.config",
        lambda i: _under(
            i.target, *_p("models.config", "data.config", "data.checks", "diffusion.modes")
        ),
    ),
    Rule(
        "leaves",
        "tfx_jax/data/config.py imports nothing of the project",
        lambda i: i.importer == "tfx_jax.data.config",
        lambda i: False,
    ),
    Rule(
        "generate",
        "tfx_jax/generate/** and tfx_jax/export.py import nothing from tfx_jax.train",
        lambda i: _under(i.importer, *_p("generate", "export")),
        lambda i: not _under(i.target, "tfx_jax.train"),
    ),
    Rule(
        "diffusion",
        "tfx_jax/diffusion/** imports only tfx_jax.diffusion.* and tfx_jax.layout",
        lambda i: _under(i.importer, "tfx_jax.diffusion"),
        lambda i: _under(i.target, *_p("diffusion", "layout")),
    ),
    Rule(
        "eval",
        "tfx_jax/eval/** imports nothing from tfx_jax.train, .cli, .stages, .demo",
        lambda i: _under(i.importer, "tfx_jax.eval"),
        lambda i: not _under(i.target, *_p("train", "cli", "stages", "demo")),
    ),
    Rule(
        "embedded",
        "nothing outside tfx_jax/data/ imports tfx_jax.data.embedded (ask the source: "
        "Source.judge, Source.describe)",
        lambda i: not _under(i.importer, "tfx_jax.data"),
        lambda i: not _under(i.target, "tfx_jax.data.embedded"),
    ),
    Rule(
        "top-level",
        "project imports are at module level, not inside a function (if TYPE_CHECKING: exempt)",
        lambda i: True,
        lambda i: not i.in_function or i.type_checking,
    ),
]


def violations(rule: Rule, imports: list[Import]) -> list[str]:
    seen, out = set(), []
    for imp in imports:
        key = (imp.file, imp.line, imp.text)
        if rule.broken_by(imp) and key not in seen:
            seen.add(key)
            out.append(f"  {imp.file}:{imp.line}: {imp.text}  [{rule.name}]")
    return out


@pytest.fixture(scope="module")
def all_imports():
    found = project_imports()
    assert len(found) > 50, "the scan found almost no project imports: is PACKAGE right?"
    return found


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_layering(rule, all_imports):
    broken = violations(rule, all_imports)
    if broken:
        pytest.fail(
            f"{len(broken)} import(s) break the '{rule.name}' layer rule ({rule.says}; see this "
            "file's docstring):\n" + "\n".join(broken),
            pytrace=False,
        )


def test_the_checker_sees_what_it_must():
    """The scanner itself: function-local, TYPE_CHECKING, relative and importlib imports."""
    source = """
import os
from typing import TYPE_CHECKING
from tfx_jax.models import attention
from . import sibling
from ..train import loop
if TYPE_CHECKING:
    from tfx_jax.train.loop import Trainer
def f():
    import numpy
    from tfx_jax.data import prepare
    importlib.import_module("tfx_jax.cli")
"""
    got = imports_of(source, "x.py", "tfx_jax.data.thing")
    rows = {(i.target, i.in_function, i.type_checking) for i in got}
    assert rows == {
        ("tfx_jax.models.attention", False, False),
        ("tfx_jax.data.sibling", False, False),
        ("tfx_jax.train.loop", False, False),
        ("tfx_jax.train.loop.Trainer", False, True),
        ("tfx_jax.data.prepare", True, False),
        ("tfx_jax.cli", True, False),
    }
    by_rule = {r.name: violations(r, got) for r in RULES}
    assert len(by_rule["data"]) == 4  # models.attention, ..train, TYPE_CHECKING train, cli
    assert [v.split()[0] for v in by_rule["top-level"]] == ["x.py:11:", "x.py:12:"]


# ----------------------------------------------------------------------------- cycles

# Cycles that exist today and are being removed (each: the modules of one strongly connected
# component). An entry is an exception, not a silence: a cycle that grows past its entry, or a
# new one, fails, and so does an entry whose cycle is gone (delete it then).
KNOWN_CYCLES_TO_REMOVE: tuple[frozenset[str], ...] = ()


def module_graph(imports: list[Import], modules: set[str]) -> dict[str, set[str]]:
    """importer -> the project modules it imports (`tfx_jax.a.b.Name` reaches the longest
    prefix that is a module; packages above it are not counted, as Python's own import of a
    package's submodule is no design dependency on the package)."""

    def module_of(target: str) -> str:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        target = module_of(imp.target)
        if target and target != imp.importer:
            graph.setdefault(imp.importer, set()).add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[frozenset[str], list[str]]]:
    """The import cycles: per strongly connected component of more than one module, its modules
    and the shortest cycle through its first module (sorted), as [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[frozenset[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = {stack.pop()}
            while v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                components.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(c, _shortest_cycle(graph, c)) for c in sorted(components, key=min)]


def _shortest_cycle(graph: dict[str, set[str]], component: frozenset[str]) -> list[str]:
    start = min(component)
    paths, seen = [[start]], {start}
    while True:  # breadth first inside the component, back to `start` (it always gets there)
        path = paths.pop(0)
        following = sorted(graph.get(path[-1], set()) & component)
        if start in following:
            return [*path, start]
        for w in following:
            if w not in seen:
                seen.add(w)
                paths.append([*path, w])


def test_no_import_cycles(all_imports):
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    found = cycles(module_graph(all_imports, modules))
    new = [path for c, path in found if not any(c <= k for k in KNOWN_CYCLES_TO_REMOVE)]
    gone = [sorted(k) for k in KNOWN_CYCLES_TO_REMOVE if not any(c & k for c, _ in found)]
    problems = [
        f"import cycle (break it by moving the shared piece down, or passing it in): "
        f"{' -> '.join(path)}"
        for path in new
    ]
    problems += [
        f"KNOWN_CYCLES_TO_REMOVE lists a cycle that is gone (delete it): {k}" for k in gone
    ]
    if problems:
        pytest.fail(
            "the tfx_jax modules' imports (TYPE_CHECKING ones included):\n  "
            + "\n  ".join(problems),
            pytrace=False,
        )


def test_the_cycle_finder_names_each_cycle():
    graph = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},
        "d": set(),
        "e": {"e", "d"},
        "x": {"y"},
        "y": {"x"},
    }
    assert cycles(graph) == [
        (frozenset("abc"), ["a", "b", "c", "a"]),
        (frozenset("xy"), ["x", "y", "x"]),
    ]
    # An import under TYPE_CHECKING closes a cycle too (the loop <-> evaluators kind).
    b = "from tfx_jax.a import Thing\n"
    a = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tfx_jax.b import f\n"
    got = imports_of(b, "b.py", "tfx_jax.b") + imports_of(a, "a.py", "tfx_jax.a")
    graph = module_graph(got, {"tfx_jax.a", "tfx_jax.b"})
    assert graph == {"tfx_jax.a": {"tfx_jax.b"}, "tfx_jax.b": {"tfx_jax.a"}}
    assert cycles(graph)[0][1] == ["tfx_jax.a", "tfx_jax.b", "tfx_jax.a"]


# ----------------------------------------------------------------------------- dispatch

# Choices with several implementations go through their registry (issue 24): a source's kind,
# the diffusion mode and the iterator contract are asked of the object, never compared by name
# outside the module that implements them.
BY_NAME = {
    '== "mixture"': {"tfx_jax/data/sources/mixture.py"},
    'mode == "rolling"': {"tfx_jax/diffusion/modes.py", "tfx_jax/diffusion/rolling.py"},
    'source == "shapes"': {"tfx_jax/data/sources/shapes.py"},
    '"position_is_global"': set(),
}


def test_no_choice_by_name():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, owners in BY_NAME.items():
                if pattern in code and rel not in owners:
                    found.append(f"{rel}:{n}: {line.strip()}  [ask the registry, not {pattern}]")
    assert not found, "choices made by name:\n  " + "\n  ".join(found)


# ----------------------------------------------------------------------------- config slices

WHOLE_CONFIG = ("Config", "RunConfig")  # annotations naming the whole run config


def config_readers(source: str, file: str) -> list[tuple[str, int, str, str, set[str], bool]]:
    """Every function with a parameter annotated as the whole run config (`Config` or the data
    code's `RunConfig` protocol): (file, line, name, annotation, the sections it reads as
    `param.section`, whether it uses the parameter otherwise — passes it on, stores it)."""
    out = []
    tree = ast.parse(source, filename=file)
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for arg in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]:
            ann = ast.unparse(arg.annotation).strip("'\"") if arg.annotation else ""
            if ann not in WHOLE_CONFIG:
                continue
            parents = {c: n for n in ast.walk(fn) for c in ast.iter_child_nodes(n)}
            sections, whole = set(), False
            for node in ast.walk(fn):
                if isinstance(node, ast.Name) and node.id == arg.arg:
                    parent = parents.get(node)
                    if isinstance(parent, ast.Attribute) and parent.value is node:
                        sections.add(parent.attr)
                    elif isinstance(node.ctx, ast.Load):
                        whole = True
            out.append((file, fn.lineno, fn.name, ann, sections, whole))
    return out


def test_components_take_their_section():
    """Models and diffusion code take their own section (`ModelConfig`, `DiffusionConfig`),
    never the run's config; data code takes `DataConfig` or, where a source's interface needs
    the image geometry, the `RunConfig` protocol — never `Config`; and a private helper that
    reads one section of a run config it does not pass on takes that section instead. (The
    public interfaces — a `Source` method, an artifact path — keep one signature for every
    implementation.)"""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for file, line, name, ann, sections, whole in config_readers(path.read_text(), rel):
            where = f"{file}:{line}: {name}({ann})"
            if rel.startswith(("tfx_jax/models/", "tfx_jax/diffusion/")):
                found.append(f"{where}  [take the section, not the run's config]")
            elif rel.startswith("tfx_jax/data/") and ann == "Config":
                found.append(f"{where}  [data code takes DataConfig or RunConfig]")
            elif name.startswith("_") and not whole and len(sections) == 1:
                found.append(f"{where} reads only .{sections.pop()}  [take that section]")
    assert not found, "whole configs where a section does:\n  " + "\n  ".join(found)


def test_the_section_checker_sees_what_it_must():
    source = (
        "def _one(cfg: Config):\n    return cfg.data.seq_len + cfg.data.seed\n"
        "def _passes(cfg: 'Config'):\n    return f(cfg) + cfg.data.seed\n"
        "def _two(cfg: RunConfig):\n    return cfg.data.seed, cfg.model.d_model\n"
    )
    got = {
        name: (sections, whole) for _, _, name, _, sections, whole in config_readers(source, "x")
    }
    assert got == {
        "_one": ({"data"}, False),
        "_passes": ({"data"}, True),
        "_two": ({"data", "model"}, False),
    }
