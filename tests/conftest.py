import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_threads_and_seed():
    # Other processes may share the cores: a fixed thread count keeps runs comparable.
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
