"""Output folders of `analyze -o` and `report -o`: never someone else's files.

A command writes into a folder only if it is new, empty, or one the same command made
earlier (it leaves a marker file there). Anything else -- the records folder, a folder of
the user's own files, a file -- is refused in one line before anything is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rdfast.errors import BadInput

MARKER = ".rdfast-output.json"


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or b.is_relative_to(a)


def check(out: Path, kind: str, records: Path | None = None, flag: str = "-o") -> Path:
    """Raise BadInput unless `kind` ("report", "analyze", "prune") may write into `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(
            f"{flag} {out} is a file; give a folder that is new, empty or an earlier {kind}"
        )
    if records is not None and _overlaps(out.resolve(), Path(records).resolve()):
        raise BadInput(
            f"{flag} {out} would hold or replace the records in {records}; give another folder"
        )
    if out.is_dir() and any(out.iterdir()):
        made_by = owner(out)
        if made_by != kind:
            what = (
                f"an rdfast {made_by} folder" if made_by else "not empty and not written by rdfast"
            )
            raise BadInput(
                f"refusing to write the {kind} into {out}: it is {what}; give a new or empty folder"
            )
    parent = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not parent.is_dir():
        raise BadInput(f"{flag} {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write to {out}: {parent} is not writable")
    return out


def owner(folder: Path) -> str | None:
    """The command that made `folder` (from its marker), or None."""
    try:
        return json.loads((Path(folder) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def mark(folder: Path, kind: str) -> None:
    (Path(folder) / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
