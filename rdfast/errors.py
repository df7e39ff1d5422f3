"""The two kinds of failure the engine distinguishes.

`BadInput` means the request itself is unusable (unknown name, impossible ratio, missing
files); the CLI turns it into one line on stderr and exit code 2, before anything is written.
`RunFailed` means a run started but could not go on (the loss became NaN/inf); the engine
records the reason in that run's manifest and carries on with the other runs.
"""


class BadInput(ValueError):
    """The request cannot be carried out as given; the message says why in one line."""


class RunFailed(RuntimeError):
    """A run stopped part-way; the message is stored in its manifest."""


class DataMissing(BadInput):
    """A dataset's files are not on this machine (and could not be downloaded): on a grid's
    driver this says nothing of the workers, which may hold them."""


class DamagedFile(Exception):
    """A file under OUT that cannot be used as written: truncated, garbled, foreign."""

    def __init__(self, path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


class DataWarning(UserWarning):
    """The data loaded, but something about it deserves a look (e.g. not the official files)."""
