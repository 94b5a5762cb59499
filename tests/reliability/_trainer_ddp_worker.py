"""One process of the Trainer-under-DDP test (spawned by test_reliability_ddp.py, as torchrun would).

Environment: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OUT_DIR (holding the tiny 'hub'
model). Trains the tiny BERT through the Trainer with ElaLoRACallback twice: straight, and stopped at a
checkpoint then resumed from it; saves each run's round history, EMAs and adapter state.
"""
import os
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

import _trainer_run as R


def snapshot(model, callback) -> dict:
    allocator = callback.allocator
    state = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k or "classifier" in k}
    state["ema_ipt"] = allocator.ema_ipt.clone()
    state["rounds"] = torch.tensor([[r.step, *r.ranks] for r in allocator.history])
    return state


def main() -> None:
    torch.set_num_threads(1)
    out = Path(os.environ["OUT_DIR"])
    auto, ddp = AutoModelForSequenceClassification, {"ddp_backend": "gloo", **R.NOT_TOKEN_AVERAGED}
    straight, _, cb_straight = R.train(out / "hub", out / "straight", auto, "SEQ_CLS", **ddp)
    R.train(out / "hub", out / "resumed", auto, "SEQ_CLS", stop_at=R.SAVE_EVERY, **ddp)
    resumed, _, cb_resumed = R.train(out / "hub", out / "resumed", auto, "SEQ_CLS",
                                     resume=str(out / "resumed" / f"checkpoint-{R.SAVE_EVERY}"), **ddp)
    torch.save({"straight": snapshot(straight, cb_straight), "resumed": snapshot(resumed, cb_resumed)},
               out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main()
