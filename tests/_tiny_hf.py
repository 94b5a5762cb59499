"""Tiny random-initialised Hugging Face models, one per supported family (built from configs: no downloads)."""
from __future__ import annotations

import torch
import transformers as T

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=64)
_DECODER = dict(_SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "bert": lambda: T.BertConfig(**_SMALL),
    "roberta": lambda: T.RobertaConfig(**_SMALL, pad_token_id=0),
    "deberta-v2": lambda: T.DebertaV2Config(**_SMALL),
    "distilbert": lambda: T.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=48, vocab_size=64),
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "llama": lambda: T.LlamaConfig(**_DECODER),
    "mistral": lambda: T.MistralConfig(**_DECODER),
    "qwen2": lambda: T.Qwen2Config(**_DECODER),
    "gemma": lambda: T.GemmaConfig(**_DECODER, head_dim=16),
    "phi": lambda: T.PhiConfig(**_DECODER),
    "t5": lambda: T.T5Config(d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2, vocab_size=64,
                             decoder_start_token_id=0),
}
# (attention + MLP projections per block) × blocks; T5 has a decoder with cross-attention too.
ADAPTED_PER_MODEL = {
    "bert": 12, "roberta": 12, "deberta-v2": 12, "distilbert": 12, "gpt2": 8, "gpt_neox": 8, "llama": 14,
    "mistral": 14, "qwen2": 14, "gemma": 14, "phi": 12, "t5": 2 * 6 + 2 * 10,
}


def config(family: str, **overrides):
    cfg = CONFIGS[family]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def model(family: str, auto=T.AutoModel, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return auto.from_config(config(family, **overrides)).eval()


def input_ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))
