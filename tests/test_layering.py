"""Layering and front-door rules, read from the source with `ast` (nothing here imports the package):

- ops/ (installed as torch_fp4kv.ops) never imports the rest of torch_fp4kv, so an engine can take
  the operator layer alone;
- the package's module-level imports form no cycle (a cycle makes import order matter: a module
  sees a half-initialized one), and none but torch_fp4kv.testing's own imports torch_fp4kv.testing;
- README.md stays a front door: at most 250 lines, every `python ...` / `torchrun ...` command it
  shows names a script or module that exists, and its links and docs/'s reach files and headings
  that exist."""

import ast
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "torch_fp4kv"
OPS = f"{PACKAGE}.ops"
# Where each package's source lives (pyproject.toml's package-dir: torch_fp4kv.ops is ops/).
SOURCES = {PACKAGE: ROOT / PACKAGE, OPS: ROOT / "ops"}
README_MAX_LINES = 250


# ---- the module table ------------------------------------------------------------------------


def module_files(sources: dict[str, Path] = SOURCES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under each source folder (a folder's
    __init__.py is the package itself)."""
    modules = {}
    for package, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, path: Path, level: int, target: str | None) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not _is_package(path):
        base = base[:-1]  # a plain module's relative imports start from its package
    if level - 1 > len(base) - 1:
        raise ValueError(f"{path}: a relative import of level {level} reaches above the top-level package")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(module: str, path: Path, known: dict[str, Path], module_level_only: bool) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file: for `from X import y`, X.y where
    that is a module of `known`, else X (whose attributes it reads; a package's parents are imported
    before it in any case, so they are no edge). Also `importlib.import_module("...")` with a constant
    name. `module_level_only` skips imports inside functions and classes and under
    `if TYPE_CHECKING:` (they do not run at import time)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                if not module_level_only:
                    visit(child)
                continue
            if isinstance(child, ast.If) and module_level_only and _type_checking(child.test):
                visit(ast.Module(body=child.orelse, type_ignores=[]))
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, path, child.level, child.module)
                submodules = [f"{base}.{alias.name}" for alias in child.names if f"{base}.{alias.name}" in known]
                if len(submodules) < len(child.names):  # names read from `base` itself
                    found.append((base, child.lineno))
                found.extend((name, child.lineno) for name in submodules)
            elif isinstance(child, ast.Call) and _is_import_module(child):
                name = child.args[0].value
                if name.startswith("."):
                    level = len(name) - len(name.lstrip("."))
                    name = _resolve(module, path, level, name.lstrip(".") or None)
                found.append((name, child.lineno))
            visit(child)

    visit(tree)
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_import_module(call: ast.Call) -> bool:
    func = call.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))
    return named and bool(call.args) and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)


# ---- the rules -----------------------------------------------------------------------------------


def ops_layering_violations(sources: dict[str, Path] = SOURCES) -> list[str]:
    """Every import in ops/ (anywhere in a file, function bodies included) of a torch_fp4kv module
    outside torch_fp4kv.ops, and every relative import reaching above ops/."""
    bad, known = [], module_files(sources)
    for module, path in known.items():
        if not (module == OPS or module.startswith(OPS + ".")):
            continue
        try:
            found = imports(module, path, known, module_level_only=False)
        except ValueError as above_top:
            bad.append(str(above_top))
            continue
        for name, line in found:
            inside_package = name == PACKAGE or name.startswith(PACKAGE + ".")
            if inside_package and not (name == OPS or name.startswith(OPS + ".")):
                bad.append(f"{_shown(path)}:{line} imports {name}")
    return bad


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def import_graph(sources: dict[str, Path] = SOURCES) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level."""
    modules = module_files(sources)
    graph = {}
    for module, path in modules.items():
        graph[module] = {name for name, _ in imports(module, path, modules, module_level_only=True)
                         if name in modules and name != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules of each strongly connected component of more than one module, sorted: each
    holds an import cycle (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def readme_commands(text: str) -> list[str]:
    """Every command line starting with `python` or `torchrun` in README's fenced code blocks
    (python code blocks aside) and inline code spans."""
    commands = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang == "python":
            continue
        for line in block.splitlines():
            for part in re.split(r"&&|;", line.split("#")[0]):
                commands.append(part.strip())
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    commands += [span.strip() for span in re.findall(r"`([^`\n]+)`", prose)]
    return [c for c in commands if re.match(r"(python3?|torchrun)\s", c)]


def missing_targets(command: str) -> list[str]:
    """The script or module a command names, if it does not exist."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    if words[0] == "torchrun":
        scripts = [w for w in words[1:] if w.endswith(".py")]
        return [s for s in scripts if not (ROOT / s).is_file()] or ([] if scripts else [command])
    rest = words[1:]
    if rest[:1] == ["-m"]:
        module = rest[1]
        if module == PACKAGE or module.startswith(PACKAGE + "."):
            files = module_files()
            ok = module in files and (not _is_package(files[module]) or (files[module].parent / "__main__.py").is_file())
            return [] if ok else [module]
        return [] if importlib.util.find_spec(module.split(".")[0]) else [module]
    if rest and rest[0].endswith(".py"):
        return [] if (ROOT / rest[0]).is_file() else [rest[0]]
    return [command]  # `python` with something this check cannot read: name it rather than pass it


# ---- the tests -----------------------------------------------------------------------------------


def test_module_table_finds_both_source_folders():
    modules = module_files()
    assert {PACKAGE, OPS, f"{OPS}.library", f"{PACKAGE}.methods", f"{PACKAGE}.hf.cache"} <= set(modules)
    assert all(path.suffix == ".py" for path in modules.values())


def test_ops_never_imports_the_rest_of_torch_fp4kv():
    bad = ops_layering_violations()
    assert not bad, "ops/ must not import the rest of torch_fp4kv:\n" + "\n".join(bad)


def test_package_imports_have_no_cycle():
    graph = import_graph()
    assert graph[PACKAGE], "the graph found none of torch_fp4kv/__init__.py's imports"
    assert OPS in graph[PACKAGE]
    found = cycles(graph)
    assert not found, "modules that import each other at module level:\n" + "\n".join(", ".join(c) for c in found)


# The command-line tools that run the testing workload (engine-made scenarios, random paged caches).
TESTING_TOOLS = (f"{PACKAGE}.check", f"{PACKAGE}.bench")


def test_the_library_never_imports_its_testing_workload():
    """torch_fp4kv.testing (the examples', tests' and tools' workload) is never imported by the
    library itself: only by the check and bench command-line tools."""
    testing = f"{PACKAGE}.testing"
    known = module_files()
    users = [f"{module} imports {name}" for module, path in known.items()
             if not module.startswith((testing, *TESTING_TOOLS))
             for name, _ in imports(module, path, known, module_level_only=False)
             if name == testing or name.startswith(testing + ".")]
    assert users == []


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; tables and history go to docs/"


def test_readme_commands_name_files_and_modules_that_exist():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert "python examples/quickstart.py" in commands and "python -m pytest -q" in commands
    missing = {command: missing_targets(command) for command in commands if missing_targets(command)}
    assert missing == {}


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(markdown: Path) -> list[str]:
    """Relative links of a Markdown file whose file, or whose #anchor among its headings, is missing."""
    text = markdown.read_text()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file, _, anchor = target.partition("#")
        path = (markdown.parent / file).resolve() if file else markdown
        if not path.exists():
            bad.append(target)
        elif anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M), re.M)
            if anchor not in {_slug(h) for h in headings}:
                bad.append(target)
    return bad


def test_readme_and_docs_links_reach_files_and_headings_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert "docs/design.md" in (ROOT / "README.md").read_text()
    bad = {page.name: broken_links(page) for page in pages if broken_links(page)}
    assert bad == {}


# ---- the checks themselves catch what they are for -------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    return {PACKAGE: tmp_path / "pkg", OPS: tmp_path / "ops"}


@pytest.mark.parametrize("line", [
    "import torch_fp4kv.methods",
    "from torch_fp4kv import cache",
    "from torch_fp4kv.hf.cache import FP4Cache",
    "from .. import methods",
    "def f():\n    from torch_fp4kv import methods",
    "import importlib\nimportlib.import_module('torch_fp4kv.layer_cache')",
])
def test_a_bad_import_in_ops_is_caught(tmp_path, line):
    sources = _tree(tmp_path, {"pkg/__init__.py": "from . import ops\n", "pkg/methods.py": "",
                               "ops/__init__.py": "from . import api\n", "ops/api.py": f"import torch\n{line}\n"})
    assert len(ops_layering_violations(sources)) == 1


@pytest.mark.parametrize("line", ["from . import formats", "from .formats import X", "import torch_fp4kv.ops.formats",
                                  "from torch_fp4kv.ops import formats"])
def test_imports_inside_ops_pass(tmp_path, line):
    sources = _tree(tmp_path, {"pkg/__init__.py": "", "ops/__init__.py": "", "ops/formats.py": "X = 1\n",
                               "ops/api.py": f"{line}\n"})
    assert ops_layering_violations(sources) == []


def test_a_cycle_is_caught_and_function_level_imports_are_not_edges(tmp_path):
    sources = _tree(tmp_path, {"pkg/__init__.py": "from .a import x\n", "pkg/a.py": "from . import b\nx = 1\n",
                               "pkg/b.py": "from .a import x\n", "pkg/c.py": "def f():\n    from . import d\n",
                               "pkg/d.py": "from . import c\n", "ops/__init__.py": ""})
    graph = import_graph(sources)
    assert graph[f"{PACKAGE}.a"] == {f"{PACKAGE}.b"} and graph[f"{PACKAGE}.c"] == set()
    assert cycles(graph) == [[f"{PACKAGE}.a", f"{PACKAGE}.b"]]


def test_readme_command_check_catches_a_missing_script_or_module():
    text = ("```bash\npython examples/quickstart.py --recipe nvfp4\npython examples/nope.py\n"
            "python -m torch_fp4kv.nope\ntorchrun --nproc-per-node 2 examples/gone.py --check\n```\n"
            "and inline `python -m torch_fp4kv.info`.\n")
    commands = readme_commands(text)
    assert commands == ["python examples/quickstart.py --recipe nvfp4", "python examples/nope.py",
                        "python -m torch_fp4kv.nope", "torchrun --nproc-per-node 2 examples/gone.py --check",
                        "python -m torch_fp4kv.info"]
    assert [c for c in commands if missing_targets(c)] == commands[1:4]


def test_link_check_catches_a_missing_file_or_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# Design\n\n## Input contract\n\n```\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text("[a](docs/design.md#input-contract) [b](docs/design.md#not-a-heading) [c](docs/gone.md) "
                    "[d](#readme) [e](https://example.com/x#y)\n\n# README\n")
    assert broken_links(page) == ["docs/design.md#not-a-heading", "docs/gone.md"]
