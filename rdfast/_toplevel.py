"""The repository's top-level `kernels/` and `cli/` folders are `rdfast.kernels` and
`rdfast.cli` (pyproject's package-dir). Run from a clone's root, where the working directory
comes first on sys.path, Python also finds them as top-level `kernels` and `cli`: names other
distributions own (transformers imports Hugging Face's `kernels` as soon as it is installed).
Imported under such a name, a folder hands the name to whatever else provides it, or to
nothing, as if the folder were not there."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, init_file: str) -> None:
    """Called by `name`'s own __init__ when imported as top-level `name`: replaces itself in
    sys.modules by the module the rest of sys.path gives (the import statement returns what
    sys.modules holds once the __init__ has run), or raises ModuleNotFoundError."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    del sys.modules[name]
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
