from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """A function that imports ``benchmarks/<name>.py`` as a module (the scripts are not a
    package; they import their sibling ``common``, so that folder is on the path meanwhile)."""

    def load(name: str):
        sys.path.insert(0, str(BENCHMARKS))
        try:
            path = BENCHMARKS / f"{name}.py"
            spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(BENCHMARKS))
        return module

    return load


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


class HostReadError(RuntimeError):
    """A tensor's value was read back to the host where none may be."""


@pytest.fixture
def no_host_reads():
    """A context manager under which every read of a tensor's value by the host fails:
    `.item()`, `.tolist()`, `.numpy()`, and bool/float/int conversions (Python branches)."""
    import contextlib

    names = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    @contextlib.contextmanager
    def guard():
        saved = {n: getattr(torch.Tensor, n) for n in names}

        def refuse(name):
            def method(self, *args, **kwargs):
                raise HostReadError(f"host read inside a sync-free region: Tensor.{name}")

            return method

        try:
            for n in names:
                setattr(torch.Tensor, n, refuse(n))
            yield
        finally:
            for n, f in saved.items():
                setattr(torch.Tensor, n, f)

    return guard
