"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import calibrated_dense, save_dense_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: intra-op threads only add synchronisation cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dense() -> torch.nn.Module:
    return calibrated_dense()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 16, 16, generator=g) for _ in range(2)]


@pytest.fixture
def dense_checkpoint(tmp_path) -> Path:
    """``calibrated_dense()`` as a plain state_dict file, for ``pipeline_config``."""
    return save_dense_checkpoint(tmp_path / "dense.pt")


# Names whose use in a test's body means it drives a whole command (``lightning-repair fit``/``evaluate``/
# ``-sweep``, in process or in a subprocess): those tests are marked ``cli`` and left out of ``make test-fast``.
CLI_DRIVERS = {"run_fit", "main", "build_cli", "sweep", "run_sweep", "subprocess"}


def pytest_collection_modifyitems(items):
    for item in items:
        functions = [getattr(item, "function", None)]  # the test, and the fixtures it uses (a fixture may run fit)
        functions += [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        names = {n for f in functions if hasattr(f, "__code__") for n in f.__code__.co_names}
        if CLI_DRIVERS & names:
            item.add_marker(pytest.mark.cli)
