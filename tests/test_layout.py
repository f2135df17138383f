"""The repository's layout and its one import rule (README, "The import rule"): commands import the
lesson, the lesson imports support/, and of the lesson support/ imports only model.py and lora.py. No
file imports a command, model.py and distill.py import nothing of ours, and nothing imports in a circle."""
import ast

import pytest
from conftest import ROOT

LESSON = {"model", "distill", "lora", "train", "decode", "data"}
COMMANDS = {"evaluate", "bench", "scripts"}
OURS = LESSON | COMMANDS | {"support"}


def our_imports(path) -> set[str]:
    """The modules of ours a file imports, anywhere in it (a function's own imports too), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in OURS}


def files() -> dict[str, set[str]]:
    """Each of our Python files (as a module name) and the modules of ours it imports."""
    graph = {}
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("*/*.py")):
        if path.parts[-2] in ("tests", ".venv") or path.name == "__init__.py" and path.parent == ROOT:
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = our_imports(path)
    return graph


def test_the_top_level_holds_the_lesson_and_the_commands():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top == {"model", "distill", "lora", "train", "decode", "evaluate", "bench"}, top
    assert (ROOT / "data").is_dir() and (ROOT / "support" / "__init__.py").is_file()


def test_one_import_rule():
    graph = files()
    assert set(graph) >= {"model", "train", "decode", "support.weights", "data", "data.own_answers"}
    for module, imports in graph.items():
        kind = module.split(".")[0]
        for name in imports:
            top = name.split(".")[0]
            assert top not in COMMANDS or kind == top, f"{module} imports the command {name}"
            if kind == "support":
                assert top == "support" or name in ("model", "lora"), f"support's {module} imports {name}"
            if module in ("model", "distill"):
                raise AssertionError(f"{module} imports {name}: it imports nothing of ours")


def package_graph() -> dict[str, set[str]]:
    """The same imports between packages: data.own_answers importing decode is data importing decode."""
    graph = {}
    for module, imports in files().items():
        graph.setdefault(module.split(".")[0], set()).update(n.split(".")[0] for n in imports)
    return graph


@pytest.mark.parametrize("level", ["modules", "packages"])
def test_no_import_circles(level):
    modules = files()
    graph = {m: {n if n in modules else n.rsplit(".", 1)[0] for n in imports} for m, imports in modules.items()}
    graph = graph if level == "modules" else package_graph()
    done, path = set(), []

    def visit(m):
        assert m not in path, "import circle: " + " -> ".join(path[path.index(m):] + [m])
        if m in done or m not in graph:
            return
        path.append(m)
        for n in graph[m] - {m}:
            visit(n)
        path.pop()
        done.add(m)
    for m in graph:
        visit(m)


def test_the_lesson_knows_nothing_of_the_cpu_kernels():
    """The few-row kernels sit behind one call at load time (support/weights.load, --no-cpu-kernels): of the
    lesson, only train.py's set-up names them."""
    for module, imports in files().items():
        if module in LESSON or module.startswith("data"):
            assert "support.cpu_kernels" not in imports or module == "train", f"{module} imports support.cpu_kernels"


def test_results_fit_one_page():
    """docs/RESULTS.md is what a user gets, on one page; the history is docs/LOG.md, each entry dated."""
    results, log = (ROOT / "docs" / name for name in ("RESULTS.md", "LOG.md"))
    assert len(results.read_text().splitlines()) <= 250
    entries = [line for line in log.read_text().splitlines() if line.startswith("## ")]
    assert entries and all(line[3:13].count("-") == 2 and " · " in line for line in entries), entries[:3]


def test_a_forward_like_gpt_fasts_and_one_objective():
    """Transformer.forward takes at most 4 arguments (idx, pos, mask, cache); distill.py holds one objective,
    mtp_loss, which train.py's step calls (gated LoRA's savings are forwards that mtp_loss is given)."""
    import inspect

    import distill
    from model import Transformer
    assert list(inspect.signature(Transformer.forward).parameters) == ["self", "idx", "pos", "mask", "cache"]
    tree = ast.parse((ROOT / "distill.py").read_text())
    losses = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and "loss" in n.name]
    assert losses == ["mtp_loss"] and callable(distill.mtp_loss)
    train = ast.parse((ROOT / "train.py").read_text())
    called = {n.func.id for n in ast.walk(train) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    imported = {a.name for n in ast.walk(train) if isinstance(n, ast.ImportFrom) and n.module == "distill" for a in n.names}
    assert "mtp_loss" in called and not any("loss" in name for name in imported - {"mtp_loss"})
