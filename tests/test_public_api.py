"""The Python API named in the README: `from rdfast import ...` gives the functions that do
the work, and `import rdfast` alone stays light (no torch)."""

import subprocess
import sys

import pytest

import rdfast
from rdfast import stats
from rdfast.pruning import given_model


def test_api_names_are_the_implementations():
    from rdfast import analyze, load_masks, load_records, prune_in_place, prune_module

    assert prune_module is given_model.prune_module
    assert prune_in_place is given_model.prune_in_place
    assert load_masks is given_model.load_masks
    assert analyze is stats.analyze
    assert load_records is stats.load
    assert set(rdfast.__all__) >= {"prune_module", "analyze", "load_records", "BadInput"}


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'prune'"):
        rdfast.prune  # noqa: B018


def test_import_rdfast_does_not_import_torch():
    code = "import sys, rdfast; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
