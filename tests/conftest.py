"""Test-suite set-up. TRITON_INTERPRET must be set before any @triton.jit decorator runs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _route_table(tmp_path_factory):
    """Measured route choices go to a table of this test session, not the user's cache."""
    from hf_plugins.kernels import _routes

    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("routes") / "routes.json"
        patch.setattr(_routes, "table_path", lambda: path)
        yield path


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """For files of small tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``): a second thread gains
    nothing there, and stalls whenever a neighbour holds a core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
