"""Defaults that depend on the Hugging Face architecture (``model.config.model_type``) or the task.

``DEFAULT_TARGETS`` is used when ``ElaLoRAConfig.target_modules`` is ``None``:
the attention and MLP projections of each family, as suffixes of module names
(``"output.dense"`` matches both ``attention.output.dense`` and the MLP's
``output.dense`` in BERT). ``TASK_HEADS`` gives the modules a task adds on top
of the pretrained body — newly initialised by ``from_pretrained``, so they must
train fully — used when ``modules_to_save`` is ``None``.
"""
from __future__ import annotations

_BERT_LIKE = ("query", "key", "value", "output.dense", "intermediate.dense")
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # transformers' Conv1D layers
    "gpt_neox": ("query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "t5": ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
}

TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")

# Language-model heads are pretrained (and usually tied to the embedding): nothing to add for those tasks.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "pre_classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# Heads that one family adds for a task besides the ones above (DeBERTa's pooler is not pretrained).
EXTRA_TASK_HEADS: dict[tuple[str, str], tuple[str, ...]] = {
    ("deberta-v2", "SEQ_CLS"): ("pooler",),
}


def model_type(model) -> str | None:
    """``model.config.model_type`` for a Hugging Face model, else ``None``."""
    return getattr(getattr(model, "config", None), "model_type", None)


def default_targets(model) -> tuple[str, ...] | None:
    """The default target suffixes for ``model``'s architecture, or ``None`` if it is not in the table."""
    return DEFAULT_TARGETS.get(model_type(model))


def task_heads(model, task_type: str | None) -> tuple[str, ...]:
    """Names of the modules ``task_type`` adds to ``model`` (may match nothing in a given model)."""
    if task_type is None:
        return ()
    return TASK_HEADS.get(task_type, ()) + EXTRA_TASK_HEADS.get((model_type(model), task_type), ())
