"""How far a run's config travels: which lib modules the calls that receive it pass through, in order.

A profile hook records every call into `lib/` whose arguments hold the config (the `RunConfig`, one of its sections,
or the config as a stored dict; methods of these count) while `train_run` trains a tiny model for one head and one
backbone epoch on the demo data. Printed: the modules in order of each such function's first call (consecutive calls
in one module merged); how many functions and modules receive the config; how many times that path goes back to a
module it had left; and the calls that re-enter a module still on the call stack (A calls B calls back into A), the
spread a reader has to follow down and back up. Each function counts once, however many batches call it.

    python bench/config_trace.py            # the counts and the path
    python bench/config_trace.py --values   # the config's field values followed too, wherever they are passed alone
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LIB = str(Path(__file__).resolve().parents[1] / "lib")
CONFIG_MODULES = ("lib.train.config", "lib.train.losses", "lib.train.model")


def holds_config(value) -> bool:
    """A RunConfig, one of its sections, or a config stored as a dict (it has the sections as keys)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value).__module__ in CONFIG_MODULES and type(value).__name__.endswith(("Config", "Schedule"))
    return isinstance(value, dict) and {"train", "loss", "model"} <= set(value)


def module_of(code) -> str:
    return code.co_filename[len(LIB) - 3:-3].replace("/", ".")


def value_ids(config) -> set[int]:
    """ids of the config's sections and of its field values that are objects of their own (strings, floats, lists,
    dicts; not small ints, bools or None, which Python shares with every other use of the same value)."""
    ids = set()

    def collect(value):
        if dataclasses.is_dataclass(value):
            ids.add(id(value))
            for f in dataclasses.fields(value):
                collect(getattr(value, f.name))
        elif isinstance(value, (str, float, list, tuple, dict)) and not (isinstance(value, str) and len(value) < 2):
            ids.add(id(value))
    collect(config)
    return ids


def config_calls(run, follow: set[int] = frozenset()) -> tuple[list[str], set, set]:
    """While `run()` runs, the lib functions whose arguments hold the config: (their modules in order of first call,
    the functions, the functions entered in a module the config had already left on the way down: the module is
    among their callers' but not their direct caller's). Each function counts once, however many batches call it."""
    path, functions, reentries = [], set(), set()
    stack = []  # (frame, module) of the config-holding calls now running

    def profile(frame, event, arg):
        if stack and event == "return" and frame is stack[-1][0]:
            stack.pop()
        if event != "call" or not frame.f_code.co_filename.startswith(LIB):
            return
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if not any(holds_config(v) or id(v) in follow for v in (frame.f_locals.get(n) for n in names)):
            return
        module = module_of(code)
        if stack and module != stack[-1][1] and module in {m for _, m in stack}:
            reentries.add(code)
        if code not in functions and (not path or path[-1] != module):
            path.append(module)
        functions.add(code)
        stack.append((frame, module))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return path, functions, reentries


def tiny_run(data: Path, splits: Path, run_dir: Path):
    """(train, config): a call that trains a tiny model on the demo photos in `data`, split in `splits`, for one head
    and one backbone epoch into run_dir, and its config."""
    from lib.train.config import build_config
    from lib.train.run import train_run

    config = build_config(data_dir=str(data), splits_dir=str(splits), backbone="resnet10t", embed_dim=16, img_size=32,
                          epochs=1, head_epochs=1, batches_per_epoch=2, p=6, k=4, num_workers=0, device="cpu",
                          unfreeze="all")
    return lambda: train_run(str(run_dir), config, progress=False), config


def demo_split(base: Path) -> tuple[Path, Path]:
    """(data, splits): the demo collection made under `base` and split as notebook 01 does by default."""
    from data_prep.make_demo import make_demo
    from lib.data.splits import SplitConfig, prepare_splits
    from lib.data.table import check_images, index_from_folder

    make_demo(base / "data")
    index, _ = index_from_folder(base / "data")
    kept, excluded = check_images(index, base / "data")
    prepare_splits(kept, base / "splits", SplitConfig(), excluded)
    return base / "data", base / "splits"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--values", action="store_true", help="follow the config's field values too (a path, a rate, a "
                                                          "list passed on alone), not only the config and its sections")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp())
    train, config = tiny_run(*demo_split(base), base / "run")
    follow = value_ids(config) if args.values else frozenset()
    path, functions, reentries = config_calls(train, follow)
    print(" -> ".join(path))
    print(f"{len(functions)} functions in {len(set(path))} modules receive the config; "
          f"{len(path) - len(set(path))} times the path goes back to a module it had left, "
          f"{len(reentries)} of them a call back into a module still on the call stack: "
          + ", ".join(sorted(f"{module_of(c)}.{c.co_name}" for c in reentries)))


if __name__ == "__main__":
    main()
