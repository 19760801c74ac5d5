"""Shared test helpers: where the parity fixtures live, and how tests skip without them."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STAR_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
SPEC = SHARED / "spec"
BPE_PATH = SHARED / "assets" / "bpe_simple_vocab_16e6.txt.gz"


def need_shared(path: Path) -> Path:
    """Skip the calling test when the shared fixtures are not beside this checkout."""
    if not path.exists():
        pytest.skip(f"{path} not found: the parity fixtures live in ../shared beside the checkout "
                    "(set STAR_SHARED to point elsewhere)")
    return path


class Payload:
    """A hostile pickle: unpickling it without weights_only=True would create the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread (and much faster when other jobs share the cores);
    the reference fixtures were made with one thread too. Use with pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
