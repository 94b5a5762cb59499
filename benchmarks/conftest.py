import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the shared cases module (cpu_cases)


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Other processes may share the cores: a fixed thread count keeps runs comparable.
    torch.set_num_threads(2)
    yield
