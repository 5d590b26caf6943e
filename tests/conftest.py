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
def raise_errors(monkeypatch):
    """Errors reach the tests as exceptions (the console script prints one line: tests/test_cli.py)."""
    monkeypatch.setenv("LIGHTNING_REPAIR_TRACEBACK", "1")


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


# Names whose use in a test's body, in its fixtures or in the helpers they call (followed a few calls deep), means
# it drives a whole command (``lightning-repair fit``/``evaluate``/``-sweep``, in process or in a subprocess) or
# starts processes: those tests are marked ``cli`` / ``ddp`` and left out of ``make test-fast``.
CLI_DRIVERS = {"run_fit", "main", "build_cli", "sweep", "run_sweep", "subprocess", "Popen"}
PROCESS_STARTERS = {"spawn", "start_processes"}


def _names(function, depth: int = 3, seen: set | None = None) -> set[str]:
    """Global names a function's code uses, and those of the module-level functions it calls, ``depth`` calls deep."""
    seen = set() if seen is None else seen
    code = getattr(function, "__code__", None)
    if code is None or code in seen:
        return set()
    seen.add(code)
    codes, names = [code], set()
    while codes:  # nested functions and lambdas too
        c = codes.pop()
        names |= set(c.co_names)
        codes += [k for k in c.co_consts if hasattr(k, "co_names")]
    if depth > 0:
        for name in list(names):
            callee = function.__globals__.get(name)
            if callable(callee) and getattr(callee, "__module__", "").startswith(("test", "helpers")):
                names |= _names(callee, depth - 1, seen)
    return names


def pytest_collection_modifyitems(items):
    for item in items:
        functions = [getattr(item, "function", None)]  # the test, and the fixtures it uses (a fixture may run fit)
        functions += [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        names = set().union(*(_names(f) for f in functions if f is not None))
        if CLI_DRIVERS & names:
            item.add_marker(pytest.mark.cli)
        if PROCESS_STARTERS & names:
            item.add_marker(pytest.mark.ddp)
