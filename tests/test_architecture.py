"""docs/ARCHITECTURE.md's file map is true to lib/: each stage's line names every module of that package, and every
module it names exists there."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^lib/(\w+)/\s")


def named_modules(text: str) -> dict[str, set[str]]:
    """{stage: module names} of the ``` block under '## Files': a stage's entry runs from its `lib/<stage>/` line to
    the next line that starts at the margin."""
    block = text.split("## Files", 1)[1].split("```")[1]
    named, stage = {}, None
    for line in block.splitlines():
        if line and not line[0].isspace():
            match = STAGE_LINE.match(line)
            stage = match.group(1) if match else None
        if stage:
            named.setdefault(stage, set()).update(m[:-3] for m in re.findall(r"(?<![/\w])(\w+\.py)\b", line))
    return named


def file_map_problems(text: str, lib: Path) -> list[str]:
    named = named_modules(text)
    problems = []
    for package in sorted(p for p in lib.iterdir() if (p / "__init__.py").exists()):
        have = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
        said = named.get(package.name, set())
        problems += [f"lib/{package.name}/{m}.py is not in the file map" for m in sorted(have - said)]
        problems += [f"the file map names lib/{package.name}/{m}.py, which does not exist" for m in sorted(said - have)]
    return problems


def test_the_file_map_names_every_lib_module_and_no_other():
    assert file_map_problems((ROOT / "docs" / "ARCHITECTURE.md").read_text(), ROOT / "lib") == []


def test_the_check_catches_a_missing_and_a_stale_module(tmp_path):
    (tmp_path / "core").mkdir()
    for name in ("__init__", "errors", "cpus"):
        (tmp_path / "core" / f"{name}.py").write_text("")
    text = "## Files\n\n```\nlib/core/       errors.py (DataError),\n                gone.py\nbench/  x.py\n```\n"
    assert file_map_problems(text, tmp_path) == ["lib/core/cpus.py is not in the file map",
                                                 "the file map names lib/core/gone.py, which does not exist"]
