"""A notebook's start: work from the repository root, with `lib` imported from that checkout.

Jupyter starts a notebook in notebooks/ and papermill wherever it is told, so relative paths in the parameters
(data/..., runs/..., splits) would mean different folders; from the root they mean one. `lib` itself comes from the
editable install (`pip install -e .`, which `make setup` and environment.yml run), and that may point at another
clone or worktree than the one the notebook is in: the root's own `lib` is then the one imported from here on.
"""
import os
import sys
from pathlib import Path


def repo_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: the current one) that holds lib/__init__.py."""
    here = Path.cwd() if start is None else Path(start)
    for folder in [here, *here.parents]:
        if (folder / "lib" / "__init__.py").exists():
            return folder
    raise FileNotFoundError(f"no repository (a folder with lib/__init__.py) at or above {here}: start the notebook "
                            "inside the repository")


def work_from_repo_root() -> Path:
    """Change to the repository root above the current folder and import `lib` from it; return the root."""
    root = repo_root()
    os.chdir(root)
    if Path(sys.modules["lib"].__file__).resolve().parent != (root / "lib").resolve():
        # Forget the other checkout's modules (this one included): the notebook's next imports find the root's.
        sys.path.insert(0, str(root))
        for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
            del sys.modules[name]
    return root
