import os

# No test may reach the Hub; set before transformers / huggingface_hub read it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from warning_guard import GUARD, report  # noqa: E402

# Two torch threads, or the cores shared out among pytest-xdist workers (scripts/test.sh runs one worker per core):
# two workers that each use both cores oversubscribe them, and tiny-model tests gain little from a second thread.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


def pytest_configure(config):
    GUARD.install()


def pytest_unconfigure(config):
    GUARD.uninstall()


@pytest.fixture(autouse=True)
def no_deprecations_from_peft_depth(request):
    """Every test fails on a deprecation warning that peft_depth's code caused (``warning_guard``)."""
    GUARD.take()
    yield
    caught = GUARD.take()
    if caught and "allow_peft_depth_deprecations" not in request.keywords:
        pytest.fail(report(caught), pytrace=False)
