"""The toy models and configs the tests share, built from code (no downloads).

* ``TinyNet`` / ``small_config``: the reliability runs' model, four adapted layers (also built by the
  DDP and resume workers);
* ``Toy`` / ``toy_config`` / ``trained_toy``: the save tests' model, three blocks of four adapted layers;
* ``randomise_adapters``: adapters that change the outputs, as after training, in any adapted model;
* ``hf_model`` / ``input_ids`` / ``trained_hf_model``: one tiny random transformers model per supported family;
* ``bert_classifier`` / ``classification_data`` / ``classification_batch`` / ``trainer_config`` /
  ``make_trainer``: the Trainer tests.

transformers is imported inside the functions that need it: the workers that build TinyNet start faster.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import elalora
from elalora import ElaLoRAConfig

# ---------------------------------------------------------------- TinyNet
IN, HID, OUT = 12, 16, 3


class _QueryValue(nn.Module):
    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.query = nn.Linear(d_in, d)
        self.value = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.value(torch.tanh(self.query(x))))


class TinyNet(nn.Module):
    """Two blocks of (query, value) plus a frozen head: four adapted layers."""

    def __init__(self) -> None:
        super().__init__()
        self.b0 = _QueryValue(IN, HID)
        self.b1 = _QueryValue(HID, HID)
        self.head = nn.Linear(HID, OUT)

    def forward(self, x):
        return self.head(self.b1(self.b0(x)))


def small_config(**changes) -> ElaLoRAConfig:
    """TinyNet's config: rounds at t = 3, 5, 7, 9, 11 (+ more if total_steps grows) with k = 2 and b = 3."""
    base = dict(
        r=3, r_max=6, lora_alpha=8.0, target_modules=("query", "value"),
        b=3, k=2, t_init=3, t_final=3, mask_interval=2, total_steps=16,
        rank_scheduler=False, orth_reg=0.1, seed=7,
    )
    base.update(changes)
    return ElaLoRAConfig(**base)


# ---------------------------------------------------------------- Toy
class _ToyBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.query(x) * torch.sigmoid(self.value(x)))))


class Toy(nn.Module):
    """Three residual blocks of (query, value, up, down) and a head: inputs of width 12."""

    def __init__(self, d=12, h=20, n=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.ModuleList([_ToyBlock(d, h) for _ in range(n)])
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for block in self.layer:
            x = block(x)
        return self.head(x)


TOY_INPUT = torch.randn(7, 12, generator=torch.Generator().manual_seed(5))


def toy_config(**changes) -> ElaLoRAConfig:
    fields = dict(r=3, r_max=6, target_modules=("query", "value", "up", "down"), t_init=2, t_final=2,
                  mask_interval=2, b=2, k=1, total_steps=14, seed=0)
    fields.update(changes)
    return ElaLoRAConfig(**fields)


def trained_toy(seed=0, **changes) -> tuple[Toy, ElaLoRAConfig]:
    """An adapted Toy with random P, λ, Q in every slot and uneven active ranks, and its config."""
    model = Toy(seed=seed)
    cfg = toy_config(**changes)
    elalora.inject(model, cfg)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for i, (_, layer) in enumerate(elalora.adapter_layers(model)):
            for p in (layer.lora_P, layer.lora_lam, layer.lora_Q):
                p.copy_(torch.randn(p.shape, generator=g))
            layer.set_active_rank(min([1, 3, 5, 6][i % 4], layer.r_max))
    return model, cfg


def randomise_adapters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Adapters that change the outputs, as after training: random P, λ, Q (× 0.3) and uneven ranks."""
    with torch.no_grad():
        for i, (_, layer) in enumerate(elalora.adapter_layers(model)):
            for p in (layer.lora_P, layer.lora_lam, layer.lora_Q):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
            layer.set_active_rank(1 + i % layer.r_max)
    return model


# ---------------------------------------------------------------- transformers models
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=64)
_DECODER = dict(_SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family: (its transformers config class, the fields of the tiny model)
HF_FAMILIES = {
    "bert": ("BertConfig", _SMALL),
    "roberta": ("RobertaConfig", dict(_SMALL, pad_token_id=0)),
    "deberta-v2": ("DebertaV2Config", _SMALL),
    "distilbert": ("DistilBertConfig", dict(dim=32, n_layers=2, n_heads=2, hidden_dim=48, vocab_size=64)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, vocab_size=64, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2)),
    "gpt_neox": ("GPTNeoXConfig", dict(_SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "llama": ("LlamaConfig", _DECODER),
    "mistral": ("MistralConfig", _DECODER),
    "qwen2": ("Qwen2Config", _DECODER),
    "gemma": ("GemmaConfig", dict(_DECODER, head_dim=16)),
    "phi": ("PhiConfig", _DECODER),
    "t5": ("T5Config", dict(d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2, vocab_size=64,
                            decoder_start_token_id=0)),
}
# (attention + MLP projections per block) × blocks; T5 has a decoder with cross-attention too.
ADAPTED_PER_MODEL = {
    "bert": 12, "roberta": 12, "deberta-v2": 12, "distilbert": 12, "gpt2": 8, "gpt_neox": 8, "llama": 14,
    "mistral": 14, "qwen2": 14, "gemma": 14, "phi": 12, "t5": 2 * 6 + 2 * 10,
}


def hf_config(family: str, **overrides):
    import transformers

    name, fields = HF_FAMILIES[family]
    cfg = getattr(transformers, name)(**fields)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def hf_model(family: str, auto=None, seed: int = 0, **overrides):
    """The family's tiny random model as ``auto`` (an Auto class; AutoModel by default) builds it, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    return (auto or transformers.AutoModel).from_config(hf_config(family, **overrides)).eval()


def input_ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def trained_hf_model(family: str, auto, task: str, seed: int = 0):
    """The family's model adapted (r = 2, r_max = 4) with adapters, ranks and head that differ from a fresh one,
    as after training."""
    model = hf_model(family, auto, seed)
    elalora.inject(model, ElaLoRAConfig(r=2, r_max=4, task_type=task, seed=3))
    g = torch.Generator().manual_seed(seed + 1)
    randomise_adapters(model, g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora_" not in name:
                p.add_(torch.randn(p.shape, generator=g))  # a trained head
    return model


# ---------------------------------------------------------------- the Trainer tests
# BERT's six adapted module types
BERT_SIX = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def bert_classifier(seed: int = 0):
    """The tiny BERT with a 2-label classification head, no dropout."""
    import transformers

    return hf_model("bert", transformers.AutoModelForSequenceClassification, seed, max_position_embeddings=32,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def classification_data(n: int = 96, seed: int = 0) -> list[dict]:
    """Examples of 12 tokens whose label depends on the first token (learnable)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 12), generator=g)
    labels = (ids[:, 0] > 32).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def classification_batch(n: int = 8, seed: int = 0, labels: bool = True) -> dict:
    """``classification_data(n, seed)`` as one batch."""
    keys = ("input_ids", "attention_mask", "labels") if labels else ("input_ids", "attention_mask")
    data = classification_data(n, seed)
    return {k: torch.stack([d[k] for d in data]) for k in keys}


def trainer_config(**changes) -> ElaLoRAConfig:
    fields = dict(r=4, r_max=8, target_modules=BERT_SIX, t_init=4, t_final=6, mask_interval=3, b=4, k=2, seed=0)
    fields.update(changes)
    return ElaLoRAConfig(**fields)


def make_trainer(output_dir, model, callback, max_steps=30, callbacks=(), **args):
    """A CPU Trainer on ``classification_data`` with ``callback`` attached; ``args`` go to TrainingArguments."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=5, save_strategy=args.pop("save_strategy", "no"), report_to=args.pop("report_to", "none"),
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0, **args,
    )
    trainer = Trainer(model=model, args=args, train_dataset=classification_data(), callbacks=list(callbacks))
    callback.attach(trainer)
    return trainer
