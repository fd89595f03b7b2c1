"""Make the repository root importable (the project is a set of top-level modules, like score_sde)."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Reference data produced from the original code, kept in the repository (tests/data/README.md says what each file is).
DATA_DIR = os.path.join(ROOT, "tests", "data")
VECTORS_DIR = os.path.join(DATA_DIR, "vectors")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# No test reaches the internet: datasets / Inception weights are never downloaded (datasets.downloads_enabled);
# tests/test_downloads.py lifts this for its own 127.0.0.1 server. Inherited by the subprocesses tests start.
os.environ["SCORE_SDE_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def single_thread():
    """Small tensors: one intra-op thread avoids spin-wait contention on the shared CPU (restored afterwards).
    A module opts in with pytestmark = pytest.mark.usefixtures("single_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
