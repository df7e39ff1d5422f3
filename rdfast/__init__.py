"""rdfast: measure how pruning distorts per-class recall, and prune with less distortion."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rdfast")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from rdfast.errors import BadInput, RunFailed

# The Python API, imported when first used (so `import rdfast` stays light).
_API = {
    "prune_module": "rdfast.pruning.given_model",
    "prune_in_place": "rdfast.pruning.given_model",
    "load_masks": "rdfast.pruning.given_model",
    "analyze": "rdfast.stats",
    "load_records": "rdfast.stats",
}

__all__ = ["BadInput", "RunFailed", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module = importlib.import_module(_API[name])
        return getattr(module, "load" if name == "load_records" else name)
    raise AttributeError(f"module 'rdfast' has no attribute {name!r}")
