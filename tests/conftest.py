# Shared test set-up. One torch thread per test process keeps subprocess-heavy tests from
# oversubscribing a small machine's cores.
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def both_cores():
    """For an in-process test that is one long computation (no subprocess to share the cores with)."""
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)
