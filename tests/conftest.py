import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Small tensors and nets: one thread avoids OpenMP barrier stalls (worst when the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle of small untrained stages (`bundle_helpers.small_bundle`), one per test module."""
    from bundle_helpers import small_bundle

    return small_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def cascade(bundle):
    """`bundle` loaded by the orchestrator, one per test module."""
    from cascade.pipeline import Cascade

    return Cascade.from_bundle(bundle)
