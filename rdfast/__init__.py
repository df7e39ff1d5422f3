"""rdfast: measure how pruning distorts per-class recall, and prune with less distortion."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rdfast")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from rdfast.errors import BadInput, RunFailed

__all__ = ["BadInput", "RunFailed", "__version__"]
