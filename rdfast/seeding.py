"""Every random stream is derived from the run's seed and a name for what it is used for.

Deriving instead of carrying one generator along makes each step reproducible on its own:
a resumed run draws exactly the numbers the uninterrupted run drew.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))
