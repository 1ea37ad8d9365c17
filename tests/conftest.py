"""Tiny seeded fixtures shared by every test (CPU only, seconds each)."""

from __future__ import annotations

import os

import pytest
import torch

from weightlab.data import ArrayDataset, class_incremental, digits


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Derived data is cached in a per-session folder, never in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WEIGHTLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits8() -> tuple[ArrayDataset, ArrayDataset]:
    return digits("train"), digits("test")


@pytest.fixture(scope="session")
def digits16() -> tuple[ArrayDataset, ArrayDataset]:
    return digits("train", size=16), digits("test", size=16)


@pytest.fixture
def stream5(digits8):
    return class_incremental(*digits8, 5, seed=0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In CI nothing may be skipped: a missing optional extra or browser is a failure, not a silent skip."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {report.longrepr}"
