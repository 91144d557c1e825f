import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # tests run with --import-mode=importlib (test files in different folders may share a
    # basename); folders with shared helper modules (tests/causal/handbuilt.py) are put
    # on the path so their tests can import them (tests/core/hf_families.py)
    import pathlib
    import sys

    here = pathlib.Path(__file__).parent
    for folder in ("causal", "core"):
        path = str(here / folder)
        if path not in sys.path:
            sys.path.insert(0, path)
