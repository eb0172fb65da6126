from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add synchronisation, badly so on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def close_environments():
    """Every environment a test built is closed when the test ends."""
    yield
    import sys

    envs = sys.modules.get("flatworld.envs")
    if envs is not None:
        envs.close_all()
