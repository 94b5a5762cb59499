import os
import sys
import time
from pathlib import Path

import pytest
import torch

from elalora_kernels import _extension

sys.path.insert(0, str(Path(__file__).parent))  # the shared cases module (cpu_cases)
import cpu_cases as C  # noqa: E402

_STARTED = {}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]  # the 1, 5 and 15 min averages `uptime` prints


def pytest_sessionstart(session):
    _STARTED.update(time=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load=_load())


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Other processes may share the cores: a fixed thread count keeps runs comparable.
    torch.set_num_threads(C.THREADS)
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """What benchmarks/compare.py writes above the tables: the run's set-up and the machine's load."""
    output_json["elalora"] = {
        "started": _STARTED.get("time"),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_start": _STARTED.get("load"),
        "load_end": _load(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": C.THREADS,
        "extension": "built" if _extension.available() else f"NOT available: {_extension.reason_unavailable()}",
        "command": " ".join(["pytest", *config.invocation_params.args]),
    }
