"""The README and docs/ quote commands, flags and notebook parameters in their code blocks; each must exist in the code,
so a renamed flag or parameter fails here instead of misleading a reader. Nothing is executed: argparse parsers are
built by calling each command's main() with parse_args intercepted, notebook parameters are read from the parameters
cell of the .py twins, make targets and variables from the Makefile."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
COMMAND_START = re.compile(r"^(make|\S*papermill|\S*python3?|\S*photo-\w+|torchrun|bash) ")
MAKE_RUN_NOTEBOOKS = ("01_", "02_", "03_", "04_", "05_")  # notebooks/run_photos.py STAGES


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _capture(self, *args, **kwargs):
    raise _Captured(self)


@dataclass
class Sources:
    """What the docs may quote, read from a repository (the real one, or an altered copy in a test)."""
    root: Path = ROOT
    parsers: dict = field(default_factory=dict)

    def notebook_parameters(self, stem: str) -> set[str]:
        """Names assigned in the notebook's parameters cell; notebook 02 also takes every run-config knob by its
        notebook name (lib.train.config.config_parameters reads PARAMETERS from its globals)."""
        text = (self.root / "notebooks" / f"{stem}.py").read_text()
        cell = text.split('# %% tags=["parameters"]', 1)[1].split("\n# %%", 1)[0]
        names = set(re.findall(r"^([A-Za-z_]\w*)\s*=", cell, re.M))
        if stem.startswith("02_"):
            from lib.train.config import PARAMETERS
            names |= set(PARAMETERS)
        return names

    def notebooks(self, prefixes=("",)) -> list[str]:
        return sorted(p.stem for p in (self.root / "notebooks").glob("[0-9][0-9]_*.py") if p.stem.startswith(prefixes))

    def make_targets(self) -> set[str]:
        return set(re.findall(r"^([\w.-]+)\s*:(?!=)", (self.root / "Makefile").read_text(), re.M))

    def make_variables(self) -> set[str]:
        return set(re.findall(r"\$\((\w+)\)", (self.root / "Makefile").read_text()))

    def scripts(self) -> dict[str, str]:
        """Console scripts (pyproject.toml) -> the module whose main() they run."""
        table = tomllib.loads((self.root / "pyproject.toml").read_text())["project"]["scripts"]
        return {name: target.split(":")[0] for name, target in table.items()}

    def options(self, where: str) -> set[str]:
        """Option strings of the argparse parser that `where` (a module name or a script path) builds in main()."""
        if where not in self.parsers:
            self.parsers[where] = _parser_of(self.root, where)
        parser = self.parsers[where]
        return set(parser._option_string_actions) if parser else set()


def _load(root: Path, where: str):
    if where.endswith(".py"):
        path = root / where
        spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
        return module
    return importlib.import_module(where)


def _parser_of(root: Path, where: str):
    """main() runs up to its parse_args call, which hands back the parser instead of parsing."""
    module = _load(root, where)
    main = getattr(module, "main", None)
    if main is None:
        return None
    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = _capture
    sys.argv = [where]
    try:
        main([]) if inspect.signature(main).parameters else main()
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv = saved
    raise AssertionError(f"{where}: main() returned without parsing arguments")


def code_commands(text: str) -> list[str]:
    """Every command line in the fenced blocks (continuation lines joined) and every inline code span that starts
    like a command."""
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += [span for span in INLINE.findall(text) if COMMAND_START.match(span)]
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _tokens(line: str) -> list[str]:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose-like lines: take the words as they are
        tokens = line.split("#", 1)[0].split()
    return [t.strip("[]") for t in tokens if t.strip("[]")]


def _pairs(tokens: list[str], flag: str = "-p") -> list[str]:
    """NAME of each `-p NAME VALUE` (a placeholder in capitals, NAME itself, is no name)."""
    return [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == flag and not tokens[i + 1].isupper()]


def _unknown_flags(tokens: list[str], options: set[str]) -> list[str]:
    flags = [t.split("=", 1)[0] for t in tokens if re.match(r"^--?[A-Za-z]", t)]
    return [f for f in flags if f not in options]


def _check_parameters(names, stems, src: Sources, what: str) -> list[str]:
    known = set().union(*(src.notebook_parameters(s) for s in stems)) if stems else set()
    return [f"{what}: parameter {n!r} is in no parameters cell of {', '.join(stems)}" for n in names if n not in known]


def check_make(tokens: list[str], src: Sources, line: str) -> list[str]:
    problems = []
    targets = [t for t in tokens[1:] if "=" not in t]
    problems += [f"{line}: make target {t!r} is not in the Makefile" for t in targets if t not in src.make_targets()]
    for assignment in (t for t in tokens[1:] if "=" in t):
        name, value = assignment.split("=", 1)
        if name not in src.make_variables():
            problems.append(f"{line}: make variable {name!r} is not used in the Makefile")
        if name == "ARGS":
            problems += _check_parameters(_pairs(_tokens(value)), src.notebooks(MAKE_RUN_NOTEBOOKS), src, line)
    return problems


def check_papermill(tokens: list[str], src: Sources, line: str) -> list[str]:
    paths = [t for t in tokens[1:] if t.endswith(".ipynb")]
    stem = Path(paths[0]).stem if paths else ""
    if stem and stem != "out" and not (src.root / "notebooks" / f"{stem}.py").exists():
        return [f"{line}: notebook {paths[0]} does not exist"]
    stems = [stem] if stem and stem != "out" else src.notebooks()
    return _check_parameters(_pairs(tokens), stems, src, line)


def check_program(where: str, args: list[str], src: Sources, line: str) -> list[str]:
    """A module (lib.x, data_prep.x) or a script path with its arguments."""
    if where.endswith(".py") and not (src.root / where).is_file():
        return [f"{line}: {where} does not exist"]
    if not where.endswith(".py") and importlib.util.find_spec(where) is None:
        return [f"{line}: module {where} does not exist"]
    problems = [f"{line}: {where} has no option {f}" for f in _unknown_flags(args, src.options(where))]
    if where.endswith(("run_photos.py", "run_all.py")):
        stems = src.notebooks(MAKE_RUN_NOTEBOOKS if where.endswith("run_photos.py") else ("",))
        problems += _check_parameters(_pairs(args), stems, src, line)
    if where.endswith("run_all.py") and {"data_dir", "metadata_csv"} & set(_pairs(args)):
        problems.append(f"{line}: run_all.py refuses other photos (data_dir, metadata_csv); quote make run instead")
    return problems


def check_command(line: str, src: Sources) -> list[str]:
    tokens = _tokens(line)
    if not tokens:
        return []
    program = Path(tokens[0]).name
    if program == "make":
        return check_make(tokens, src, line)
    if program == "papermill":
        return check_papermill(tokens, src, line)
    if program in src.scripts():
        return check_program(src.scripts()[program], tokens[1:], src, line)
    if program == "bash" and len(tokens) > 1:
        return [] if (src.root / tokens[1]).is_file() else [f"{line}: {tokens[1]} does not exist"]
    if program in ("python", "python3", "torchrun"):
        if "-m" in tokens:
            i = tokens.index("-m")
            module = tokens[i + 1]
            return [] if module in ("pytest", "pip", "venv") else check_program(module, tokens[i + 2:], src, line)
        if program != "torchrun" and len(tokens) > 1:
            return check_program(tokens[1], tokens[2:], src, line)
    return []


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def check_links(doc: Path) -> list[str]:
    problems = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            problems.append(f"{doc.name}: link {target} points to a missing file")
        elif anchor and file.suffix == ".md":
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
            if anchor not in anchors:
                problems.append(f"{doc.name}: link {target}: no heading with that anchor in {file.name}")
    return problems


def problems_in(text: str, src: Sources) -> list[str]:
    return [p for line in code_commands(text) for p in check_command(line, src)]


@pytest.fixture(scope="module")
def src():
    return Sources()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_quoted_command_flag_and_parameter_exists(doc, src):
    assert problems_in(doc.read_text(), src) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_resolves(doc):
    assert check_links(doc) == []


def test_the_readme_is_short_and_links_every_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme) if t.startswith("docs/")}
    assert linked >= {p.name for p in (ROOT / "docs").glob("*.md")}


def test_the_check_sees_the_commands_in_the_docs(src):
    """The docs quote each kind of command the check understands, so an empty parse cannot pass silently."""
    quoted = [_tokens(line)[0] for doc in DOCS for line in code_commands(doc.read_text())]
    names = {Path(t).name for t in quoted}
    assert {"make", "papermill", "python", "photo-predict", "photo-enroll", "torchrun"} <= names


# the check must fail when the code moves away from the docs: each case alters a copy of the code
README_RUN = 'make run DATA=../shared/datasets/lions/train RUN=lions ARGS="-p min_size 32 -p group_by file -p epochs 1"'


def _copy_repo(tmp_path: Path) -> Path:
    (tmp_path / "notebooks").mkdir()
    for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py"):
        (tmp_path / "notebooks" / p.name).write_text(p.read_text())
    for name in ("Makefile", "pyproject.toml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    return tmp_path


def test_a_renamed_notebook_parameter_fails(tmp_path):
    assert README_RUN in (ROOT / "docs" / "your-data.md").read_text()
    root = _copy_repo(tmp_path)
    assert problems_in(f"```bash\n{README_RUN}\n```", Sources(root)) == []
    nb = root / "notebooks" / "01_split.py"
    nb.write_text(nb.read_text().replace("\nmin_size = ", "\nmin_side = "))
    assert problems_in(f"```bash\n{README_RUN}\n```", Sources(root)) == [
        f"{README_RUN}: parameter 'min_size' is in no parameters cell of {', '.join(Sources(root).notebooks(MAKE_RUN_NOTEBOOKS))}"]
    papermill = ".venv/bin/papermill notebooks/01_split.ipynb out.ipynb -p min_size 32"
    assert len(problems_in(f"`{papermill}`", Sources(root))) == 1


def test_a_renamed_make_target_or_variable_fails(tmp_path):
    root = _copy_repo(tmp_path)
    make = root / "Makefile"
    make.write_text(make.read_text().replace("\nrun: setup", "\nphotos: setup").replace("$(ARGS)", "$(EXTRA)"))
    found = problems_in(f"```bash\n{README_RUN}\n```", Sources(root))
    assert any("make target 'run'" in p for p in found) and any("make variable 'ARGS'" in p for p in found)


def test_a_renamed_flag_fails(monkeypatch):
    line = ".venv/bin/photo-predict runs/x photos/ --out p.csv --refuse-small"
    assert problems_in(f"```bash\n{line}\n```", Sources()) == []
    add = argparse.ArgumentParser.add_argument

    def renamed(self, *names, **kwargs):
        return add(self, *("--refuse-tiny" if n == "--refuse-small" else n for n in names), **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", renamed)
    assert problems_in(f"```bash\n{line}\n```", Sources()) == [f"{line}: lib.evaluate.predict_cli has no option "
                                                              f"--refuse-small"]


def test_a_missing_script_module_or_link_fails(tmp_path):
    text = "```bash\n.venv/bin/python bench/bench_nothing.py --x 1\npython -m lib.evaluate.nothing\n```"
    assert len(problems_in(text, Sources())) == 2
    doc = tmp_path / "page.md"
    doc.write_text("[a](missing.md) [b](page.md#no-such-heading) [c](page.md#a-heading)\n\n## A heading\n")
    assert check_links(doc) == [f"page.md: link missing.md points to a missing file",
                                "page.md: link page.md#no-such-heading: no heading with that anchor in page.md"]
