"""LIFT on Hugging Face models: target selection, the transformers Trainer, and the real MiniLM-L6."""

from __future__ import annotations

import pytest
import torch

from weightlab.methods.lift.model import LiftConfig, extract_delta, prepare


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config)


def toy_examples(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (n, 8), generator=g)
    labels = (ids[:, 0] > 22).long()
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]


def test_hf_model_targets_exclude_the_classifier_and_trainer_trains_it(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    model = tiny_bert()
    lift = prepare(model, LiftConfig(rank=2, lora_rank=1, lr=1e-2, refresh_every=3))
    names = list(lift.targets)
    assert "classifier" not in names and "bert.encoder.layer.0.attention.self.query" in names
    assert all(".dense" in n or n.endswith(("query", "key", "value")) for n in names)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=16,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             learning_rate=1e-2, lr_scheduler_type="constant")
    Trainer(model=model, args=args, train_dataset=toy_examples(), optimizers=(lift.optimizer, None)).train()
    assert lift.optimizer.steps == 6
    delta = extract_delta(model)
    for name, d in delta.items():
        changed = (d != 0).sum().item()
        assert 0 < changed <= 3 * lift.config.budget(tuple(d.shape)), name


@pytest.mark.slow
def test_lift_fine_tunes_the_real_minilm_beyond_a_frozen_encoder() -> None:
    from weightlab.experiments._lift_minilm import minilm_demo

    rows = {r["method"]: r for r in minilm_demo(steps=40, n_train=256, n_test=256)}
    assert rows["lift"]["test acc (%)"] > rows["head only"]["test acc (%)"] + 10
