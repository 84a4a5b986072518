# Shared test set-up. The machine that runs CI has two cores; one torch thread per test process
# keeps subprocess-heavy tests from oversubscribing them.
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def both_cores():
    """For an in-process test that is one long computation (no subprocess to share the cores with)."""
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)
