"""The one-way house (docs/architecture.md), kept by a walk over the AST of engine/, jobs/ and
schemas/: no import circle; a stage never imports another stage, and nothing below the stages
imports one; the engine reaches a stage only through the registry's strings; schemas import
nothing of engine/ or jobs/ and never open a store; a store group's path is spelled only by the
module that owns it, and its root constant is imported only by the stage that writes it.

Each rule is also shown to fail: the tests copy the tree and break it on purpose.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOPS = ("engine", "jobs", "schemas")
GROUP_OWNERS = {
    "/potential": "jobs.layouts.potential", "/learn": "jobs.layouts.learn",
    "/md": "jobs.layouts.md", "/label": "jobs.layouts.label", "/train": "jobs.layouts.train",
    "/infer": "jobs.layouts.infer", "/analyze": "jobs.layouts.analyze",
    "/spectrum": "jobs.layouts.spectrum", "/probe": "jobs.layouts.probe",
    "/stages": "engine.store",
}
"""Store group -> the one module that spells its paths."""
STORE_OPENERS = {"h5py", "engine.store", "engine"}
"""What a schema module may not import (it would open, or reach, the store)."""


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for top in TOPS:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _stages(root: Path) -> dict[str, str]:
    """Stage name -> module, read from engine/stages.py's STAGES (without importing it)."""
    tree = ast.parse((root / "engine" / "stages.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id == "STAGES":
                return {k.value: v.value for k, v in zip(node.value.keys, node.value.values)}
    raise AssertionError("engine/stages.py defines no STAGES")


def _imports(module: str, path: Path, tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) of every import, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def _unchecked_strings(tree: ast.Module) -> set[int]:
    """ids of the string constants that cannot start a store path: docstrings and bare string
    statements, and the pieces of an f-string after its first (``f"{group}/label/{name}"``
    names a subgroup of `group`, whichever group that is)."""
    skip = {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip |= {id(part) for part in node.values[1:]}
    return skip


def house_problems(root: Path) -> list[str]:
    """Every breach of the one-way house in the tree at `root`, one line each."""
    mods = _modules(root)
    stages = _stages(root)
    stage_of = {m: name for name, target in stages.items() for m in mods
                if m == target or m.startswith(target + ".")}
    layout_of_stage = {name: f"jobs.layouts.{name}" for name in stages}

    def known(name: str) -> str | None:
        while name:
            if name in mods:
                return name
            name = name.rpartition(".")[0]
        return None

    problems, edges = [], {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        where = f"{path.relative_to(root)}"
        for target, names, line in _imports(module, path, tree):
            hits = {known(target)} | {known(f"{target}.{n}") for n in names}
            for hit in hits - {None, module}:
                edges[module].add(hit)
                if hit in stage_of and stage_of.get(module) != stage_of[hit]:
                    if module in stage_of:
                        problems.append(f"{where}:{line}: stage {stage_of[module]} imports stage "
                                        f"module {hit}")
                    elif module.startswith("engine"):
                        problems.append(f"{where}:{line}: the engine imports stage module {hit} "
                                        "(use engine.stages.stage_module)")
                    else:
                        problems.append(f"{where}:{line}: {module} (below the stages) imports "
                                        f"stage module {hit}")
            if module.startswith("schemas"):
                top = target.split(".")[0]
                if target in STORE_OPENERS or top in ("engine", "jobs", "h5py"):
                    problems.append(f"{where}:{line}: a schema imports {target} (schemas import "
                                    "nothing of engine/ or jobs/ and never open a store)")
            owner = known(target)
            if owner in GROUP_OWNERS.values() and owner.startswith("jobs.layouts."):
                roots = [n for n in names if n == "GROUP" or n.endswith("_GROUP")
                         or n == "MODEL_PATH"]
                writer = layout_of_stage.get(stage_of.get(module, ""))
                reader = module in stage_of or module.startswith("engine")
                if roots and reader and owner != writer:
                    problems.append(f"{where}:{line}: imports the root {roots} of {owner}; only "
                                    "its own stage may (others read through its functions)")
        docstrings = _unchecked_strings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docstrings):
                for group, owner in GROUP_OWNERS.items():
                    text = node.value
                    if (text == group or text.startswith(group + "/")) and module != owner:
                        problems.append(f"{where}:{node.lineno}: spells {group!r} ({text!r}); "
                                        f"only {owner} may")
    problems += [f"import circle: {' -> '.join(c)}" for c in _circles(edges)]
    return problems


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def test_the_house_is_one_way():
    assert house_problems(ROOT) == []


@pytest.fixture
def tree_copy(tmp_path):
    """A copy of engine/, jobs/ and schemas/ (Python files only) to break on purpose."""
    for top in TOPS:
        shutil.copytree(ROOT / top, tmp_path / top,
                        ignore=shutil.ignore_patterns("__pycache__", "*.h5", "*.pb", "*.json"))
    assert house_problems(tmp_path) == []
    return tmp_path


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + "\n" + text + "\n")


def test_a_stage_importing_a_stage_is_caught(tree_copy):
    _append(tree_copy / "jobs" / "stages" / "analyze.py", "from jobs.stages.md import run")
    problems = house_problems(tree_copy)
    assert any("stage analyze imports stage module jobs.stages.md" in p for p in problems)


def test_an_import_circle_is_caught(tree_copy):
    _append(tree_copy / "jobs" / "sites.py", "import jobs.hops")
    _append(tree_copy / "jobs" / "hops.py", "import jobs.sites")
    assert any(p.startswith("import circle:") and "jobs.hops" in p and "jobs.sites" in p
               for p in house_problems(tree_copy))


def test_the_engine_importing_a_stage_and_a_helper_importing_one_are_caught(tree_copy):
    _append(tree_copy / "engine" / "show.py", "from jobs.stages.learn import run")
    _append(tree_copy / "jobs" / "exchange.py", "from jobs.stages.spectrum import run")
    problems = house_problems(tree_copy)
    assert any("the engine imports stage module jobs.stages.learn" in p for p in problems)
    assert any("jobs.exchange (below the stages) imports stage module" in p for p in problems)


def test_a_schema_opening_the_store_is_caught(tree_copy):
    _append(tree_copy / "schemas" / "infer.py", "import h5py")
    assert any("schemas/infer.py" in p and "h5py" in p for p in house_problems(tree_copy))


def test_a_group_spelled_outside_its_owner_is_caught(tree_copy):
    _append(tree_copy / "jobs" / "stages" / "report.py", 'EXTRA = "/analyze/x/sites"')
    _append(tree_copy / "jobs" / "stages" / "spectrum.py",
            "from jobs.layouts.analyze import GROUP as ANALYZED")
    problems = house_problems(tree_copy)
    assert any("spells '/analyze'" in p and "report.py" in p for p in problems)
    assert any("imports the root ['GROUP'] of jobs.layouts.analyze" in p for p in problems)
