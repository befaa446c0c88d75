import os

import pytest
import torch

# Tests are sized for 2 CPU cores; more threads only add contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh directory with the default (local sqlite) MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(autouse=True)
def _restore_grad_mode():
    """The benchmark scripts' `main` turns autograd off for their process
    (`torch.set_grad_enabled(False)`); a test that calls one must not leave it off for the
    tests after it (which then fail or pass depending on their order)."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)
