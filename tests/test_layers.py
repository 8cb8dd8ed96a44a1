"""The layer order of lib, written once: a stage package may import its own stage and earlier ones, never a later one
(so the data flows one way and a stage can be read, tested and replaced without those after it)."""
import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"
LAYERS = ("core", "data", "retrieval", "train", "evaluate", "analysis", "probe")


def lib_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every lib import in a file, those inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "lib" else [f"lib.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names if n.split(".")[0] == "lib"]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lib"]
    return out


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(lib: Path = LIB) -> list[str]:
    bad = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if len(rel.parts) < 2:
            continue  # lib/__init__.py holds no code
        own = rel.parts[0]
        for line, module in lib_imports(path):
            other = stage(module)
            if other not in LAYERS:
                bad.append(f"lib/{rel}:{line} imports {module}, which is in no stage of {LAYERS}")
            elif LAYERS.index(other) > LAYERS.index(own):
                bad.append(f"lib/{rel}:{line} ({own}) imports {module} from the later stage {other}")
    return bad


def test_every_lib_module_is_in_a_stage_package():
    loose = [p.name for p in LIB.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the stage packages: {loose}"
    assert sorted(p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS)


def test_no_stage_imports_a_later_one():
    assert layer_violations() == []


def test_the_check_catches_an_upward_import(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.py").write_text("def f():\n    from lib.train.model import create_model\n")
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "y.py").write_text("from lib.data import x\nfrom lib import train\n")
    assert layer_violations(tmp_path) == ["lib/data/x.py:2 (data) imports lib.train.model from the later stage train"]


MAX_PARAMETERS = 8


def long_signatures(lib: Path = LIB) -> list[str]:
    """lib functions taking more than MAX_PARAMETERS (self and cls aside) whose def is not preceded by a comment
    line '# N parameters: <why>'."""
    bad = []
    for path in sorted(lib.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            n = len([x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")])
            if n <= MAX_PARAMETERS:
                continue
            i = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 2  # the line above the def
            comments = []
            while i >= 0 and lines[i].strip().startswith("#"):  # the comment block right above it
                comments.append(lines[i].strip())
                i -= 1
            if not any(c.startswith(f"# {n} parameters:") for c in comments):
                bad.append(f"lib/{path.relative_to(lib)}:{node.lineno} {node.name} takes {n} parameters")
    return bad


def test_no_lib_function_takes_more_than_eight_parameters_without_a_reason():
    assert long_signatures() == []


def test_the_parameter_check_catches_a_long_signature(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "a.py").write_text("def f(a, b, c, d, e, f, g, h, i):\n    pass\n\n\n"
                                            "# 9 parameters: each one a flag of a command\n"
                                            "def g(a, b, c, d, e, f, g, h, i):\n    pass\n")
    assert long_signatures(tmp_path) == ["lib/core/a.py:1 f takes 9 parameters"]
