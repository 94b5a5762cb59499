"""Why ElaLoRA (and AdaLoRA) start slowly: per-step traces of the adapter factors.

Runs one method on the quality study's set-up (``benchmarks/quality.py``) and
prints, every ``--every`` steps: the task loss, the mean |λ| of the active
ranks, the task-gradient norms of P, Q and λ (summed over all adapted
matrices, before clipping), and the orthogonality penalty's share of the P/Q
gradient, ``‖g_pen‖ / (‖g_pen‖ + ‖g_task‖)``. Names are ElaLoRA's; for PEFT
AdaLoRA P = lora_B, λ = lora_E, Q = lora_A.

    python benchmarks/slow_start.py --method elalora --lr 2e-3
    python benchmarks/slow_start.py --method elalora --lr 2e-3 --init zero_p
    python benchmarks/slow_start.py --method adalora --lr 2e-3
    python benchmarks/slow_start.py --demo --lr 5e-3 --every 10 --init zero_p   # the demo's set-up
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402
from elalora import demo  # noqa: E402

FACTORS = {"elalora": ("lora_P", "lora_lam", "lora_Q"), "adalora": ("lora_B", "lora_E", "lora_A")}


def peft_adalora_penalty(model, weight: float) -> torch.Tensor:
    """PEFT AdaLoraModel.forward's penalty (mean Frobenius norm of AAᵀ−I and BᵀB−I), recomputed to
    take its gradient apart from the task's; ``trace`` checks it equals what PEFT added to the loss."""
    norms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            norms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0])))
    return weight * torch.stack(norms).mean()


def trace(method: str, task: str, r: int, lr: float, seed: int, setup: dict, every: int, **options) -> list[dict]:
    train, test = quality.load_task(task, setup)
    run = quality.build(method, r, seed, setup, **options)
    model = run.model
    p_name, lam_name, q_name = FACTORS["adalora" if method == "adalora" else "elalora"]
    params = {kind: [p for n, p in model.named_parameters() if n.endswith(kind) or f".{kind}." in n]
              for kind in (p_name, lam_name, q_name)}
    grads: dict = {}

    def keep(kind, i):
        def hook(g):  # the whole gradient of this step, before clipping
            grads[kind, i] = g.detach().clone()
        return hook

    for kind, ps in params.items():
        for i, p in enumerate(ps):
            p.register_hook(keep(kind, i))
    records: list[dict] = []
    pen_grads: dict = {}
    losses: list[float] = []
    model.register_forward_hook(lambda module, args, out: losses.append(float(out.loss.detach())) if model.training else None)

    def extra_loss():
        if method == "adalora":
            pen = peft_adalora_penalty(model, run.peft_orth_reg)  # already inside PEFT's loss: measure only
            added = torch.zeros(())
        else:
            pen = added = run.extra_loss()
        factors = params[p_name] + params[q_name]
        if pen.requires_grad:
            g = torch.autograd.grad(pen, factors, retain_graph=True)
        else:
            g = [torch.zeros_like(p) for p in factors]
        pen_grads["P"], pen_grads["Q"] = g[: len(params[p_name])], g[len(params[p_name]):]
        pen_grads["value"] = float(pen)
        return added

    def after_step(t):
        run.after_step(t)
        rec = {"step": t}
        for key, kind in (("P", p_name), ("Q", q_name)):
            total = [grads[kind, i] for i in range(len(params[kind]))]
            task = [tg - pg for tg, pg in zip(total, pen_grads[key])]
            t_norm = float(torch.stack([x.norm() for x in task]).norm())
            p_norm = float(torch.stack([x.norm() for x in pen_grads[key]]).norm())
            rec[f"grad_{key}"] = t_norm
            rec[f"pen_share_{key}"] = p_norm / (p_norm + t_norm + 1e-30)
        rec["grad_lam"] = float(torch.stack([grads[lam_name, i].norm() for i in range(len(params[lam_name]))]).norm())
        rec["lam_abs"] = float(torch.cat([p.detach().abs().flatten() for p in params[lam_name]]).mean())
        rec["penalty"] = pen_grads["value"]
        records.append(rec)
        grads.clear()

    demo.train_loop(model, train, batch_size=setup["batch_size"], epochs=setup["epochs"], lr=lr, seed=seed,
                             extra_loss=extra_loss, after_step=after_step, on_optimizer=run.on_optimizer,
                             progress=False)
    for rec, loss in zip(records, losses):
        rec["loss"] = loss - (rec["penalty"] if method == "adalora" else 0.0)  # PEFT's loss includes its penalty
    acc = demo.evaluate(model, test)
    for rec in records[::every] + records[-1:]:
        window = [r["loss"] for r in records[max(0, rec["step"] - every + 1): rec["step"] + 1]]
        print(f"step {rec['step']:4d}  loss {rec['loss']:.3f} (mean of last {len(window)}: "
              f"{sum(window) / len(window):.3f})  |λ| {rec['lam_abs']:.2e}  "
              f"‖g_P‖ {rec['grad_P']:.2e}  ‖g_Q‖ {rec['grad_Q']:.2e}  ‖g_λ‖ {rec['grad_lam']:.2e}  "
              f"penalty share P {rec['pen_share_P']:.2f} Q {rec['pen_share_Q']:.2f}", flush=True)
    print(f"{method} {options} lr {lr:g} r {r} seed {seed} task {task}: accuracy {acc:.4f}", flush=True)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="elalora", choices=["elalora", "adalora", "lora"])
    p.add_argument("--task", default="movies", choices=list(quality.TASKS))
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="paper", help="ElaLoRA only")
    p.add_argument("--orth-reg", type=float, default=None, help="ElaLoRA only (default: the config's)")
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--json", default=None, help="write the per-step records here")
    p.add_argument("--demo", action="store_true", help="the demo's set-up (2,000 sentences, batch 16, 125 steps)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    options = {}
    if args.method == "elalora":
        options["init"] = args.init
        if args.orth_reg is not None:
            options["orth_reg"] = args.orth_reg
    setup = quality.SETUP
    if args.demo:
        setup = dict(n_train=demo.DEFAULTS["n_train"], n_test=demo.DEFAULTS["n_test"],
                     batch_size=demo.DEFAULTS["batch_size"], epochs=demo.DEFAULTS["epochs"], max_length=demo.MAX_LENGTH)
    records = trace(args.method, args.task, args.r, args.lr, args.seed, setup, args.every, **options)
    if args.json:
        Path(args.json).write_text(json.dumps(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
