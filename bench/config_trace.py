"""How far a run's config travels: which lib modules the calls that receive it pass through, in order.

A profile hook records every call into `lib/` whose arguments hold the config (the `RunConfig`, one of its sections,
or the config as a stored dict) while `train_run` trains a tiny model for one head and one backbone epoch on the
demo data. Printed: the modules in order of each such function's first call (consecutive calls in one module merged), how many distinct modules
that path enters, and how many times it comes back to a module it had already left.

    python bench/config_trace.py            # the counts and the path
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LIB = str(Path(__file__).resolve().parents[1] / "lib")
CONFIG_MODULES = ("lib.train.config", "lib.train.losses", "lib.train.model", "lib.core.device")


def holds_config(value) -> bool:
    """A RunConfig, one of its sections, or a config stored as a dict (it has the sections as keys)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value).__module__ in CONFIG_MODULES and type(value).__name__.endswith(("Config", "Schedule", "Settings"))
    return isinstance(value, dict) and {"train", "loss", "model"} <= set(value)


def config_path(run) -> list[str]:
    """The modules, in order of first call, of the lib functions whose arguments hold the config while `run()` runs
    (each function once, so the count does not grow with the number of batches)."""
    path: list[str] = []
    seen: set = set()

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(LIB):
            return
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if code not in seen and any(holds_config(frame.f_locals.get(n)) for n in names):
            seen.add(code)
            module = frame.f_code.co_filename[len(LIB) - 3:-3].replace("/", ".")
            if not path or path[-1] != module:
                path.append(module)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return path


def counts(path: list[str]) -> tuple[int, int]:
    """(distinct modules entered, returns to a module already left) of a merged call path."""
    return len(set(path)), len(path) - len(set(path))


def main() -> None:
    from data_prep.make_demo import make_demo
    from lib.data.splits import SplitConfig, prepare_splits
    from lib.data.table import check_images, index_from_folder
    from lib.train.config import build_config
    from lib.train.run import train_run

    base = Path(tempfile.mkdtemp())
    make_demo(base / "data")
    index, _ = index_from_folder(base / "data")
    kept, excluded = check_images(index, base / "data")
    prepare_splits(kept, base / "splits", SplitConfig(), excluded)
    config = build_config(data_dir=str(base / "data"), splits_dir=str(base / "splits"), backbone="resnet10t",
                          embed_dim=16, img_size=32, epochs=1, head_epochs=1, batches_per_epoch=2, p=6, k=4,
                          num_workers=0, device="cpu", unfreeze="all")
    path = config_path(lambda: train_run(str(base / "run"), config, progress=False))
    modules, returns = counts(path)
    print(" -> ".join(path))
    print(f"modules entered: {modules}; returns to a module already left: {returns}")


if __name__ == "__main__":
    main()
