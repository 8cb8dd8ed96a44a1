"""docs/ARCHITECTURE.md's file map is true to lib/: each stage's line names every module of that package, and every
module it names exists there."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where a run's config and its sections go (docs/ARCHITECTURE.md, "Where the config goes")
CONFIG_MODULES = ("run", "config", "model", "losses", "state", "tracking")
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


def _config_trace():
    spec = importlib.util.spec_from_file_location("config_trace", ROOT / "bench" / "config_trace.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_runs_config_reaches_only_the_modules_the_architecture_names(demo, tmp_path):
    """The config and its sections go where docs/ARCHITECTURE.md says (the assembly, the config's own methods, the
    model, the loss, the state a checkpoint carries, the tracker's parameters); every other part takes the values it
    reads. Traced while a tiny run trains one head and one backbone epoch (bench/config_trace.py)."""
    trace = _config_trace()
    train, _ = trace.tiny_run(*demo, tmp_path / "run")
    path, functions, reentries = trace.config_calls(train)
    reached, named = set(path), {f"lib.train.{m}" for m in CONFIG_MODULES}
    assert reached == named, (f"reached, not named: {sorted(reached - named)}; "
                              f"named, not reached: {sorted(named - reached)}")
    assert not reentries
    said = (ROOT / "docs" / "ARCHITECTURE.md").read_text().split("The config and its sections reach", 1)[1][:400]
    assert all(f"{m}.py" in said for m in CONFIG_MODULES)
