"""One process of the orthogonality-penalty-under-DDP test (spawned by test_reliability_ddp.py, as torchrun
would). Environment: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OUT_DIR (holding the tiny 'hub'
models). Runs every case of ``_orth_cases.CASES`` through the Trainer with 4 examples per process and saves
each run's adapters."""
import os
from pathlib import Path

import torch

import _orth_cases as C


def main() -> None:
    torch.set_num_threads(1)
    out = Path(os.environ["OUT_DIR"])
    runs = {case: C.run(out, case, per_device=C.GLOBAL_BATCH // 2, ddp_backend="gloo") for case in C.CASES}
    torch.save(runs, out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main()
