"""LIFT on Hugging Face models: target selection, the transformers Trainer, and the real MiniLM-L6."""

from __future__ import annotations

import pytest
import torch

from weightlab.errors import WeightlabError
from weightlab.methods.lift import from_pretrained
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


def trainer_args(tmp_path, steps: int = 6, **kwargs: object):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=16,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             learning_rate=1e-2, lr_scheduler_type="constant", **kwargs)


def test_hf_model_targets_exclude_the_classifier_and_trainer_trains_it(tmp_path) -> None:
    from transformers import Trainer

    model = tiny_bert()
    lift = prepare(model, LiftConfig(rank=2, lora_rank=1, lr=1e-2, refresh_every=3, modules_to_save=("classifier",)))
    names = list(lift.targets)
    assert "classifier" not in names and "bert.encoder.layer.0.attention.self.query" in names
    assert all(".dense" in n or n.endswith(("query", "key", "value")) for n in names)
    args = trainer_args(tmp_path)
    Trainer(model=model, args=args, train_dataset=toy_examples(), **lift.trainer_kwargs()).train()
    assert lift.optimizer.steps == 6 and args.max_grad_norm == 1.0  # clipping handed back after the run
    delta = extract_delta(model)
    for name, d in delta.items():
        changed = (d != 0).sum().item()
        assert 0 < changed <= 3 * lift.config.budget(tuple(d.shape)), name
    fresh = from_pretrained(tiny_bert(), lift.save_pretrained(tmp_path / "adapter"))
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_trainer_with_its_own_optimizer_fails_loudly(tmp_path) -> None:
    from transformers import Trainer

    from weightlab.integrations.hf import WeightlabCallback

    model = tiny_bert()
    lift = prepare(model, LiftConfig(rank=2, lora_rank=1))
    Trainer(model=model, args=trainer_args(tmp_path, steps=2), train_dataset=toy_examples()).train()
    with pytest.raises(WeightlabError, match="LIFT's optimizer gathered gradients of 2 backward passes but was "
                                             "never stepped"):
        lift.save_pretrained(tmp_path / "adapter")
    with pytest.raises(WeightlabError, match=r"the Trainer steps AdamW, not LIFT's SparseAdamW.*trainer_kwargs"):
        Trainer(model=model, args=trainer_args(tmp_path, steps=2), train_dataset=toy_examples(),
                callbacks=[WeightlabCallback(lift=lift)]).train()


def test_an_optimizer_that_skips_its_steps_is_caught_at_the_end(tmp_path, monkeypatch) -> None:
    from transformers import Trainer

    model = tiny_bert()
    lift = prepare(model, LiftConfig(rank=2, lora_rank=1))
    monkeypatch.setattr(lift.optimizer, "step", lambda closure=None: None)
    with pytest.raises(WeightlabError, match="made 2 optimizer steps but LIFT's optimizer never stepped"):
        Trainer(model=model, args=trainer_args(tmp_path, steps=2), train_dataset=toy_examples(),
                **lift.trainer_kwargs()).train()


def test_trainer_clipping_reaches_the_gathered_gradients(tmp_path) -> None:
    from transformers import Trainer

    def moved(max_grad_norm: float) -> float:
        model = tiny_bert()
        lift = prepare(model, LiftConfig(rank=2, lora_rank=1, lr=1e-2, eps=1e-8))
        Trainer(model=model, args=trainer_args(tmp_path, steps=2, max_grad_norm=max_grad_norm),
                train_dataset=toy_examples(), **lift.trainer_kwargs()).train()
        return sum(float(d.abs().sum()) for d in extract_delta(model).values())

    # Adam normalises the step size, so only a clip far below the gradient norm shrinks the update
    assert moved(1e-9) < 0.05 * moved(0.0)


def test_trainable_counts_are_lift_entries_not_whole_matrices() -> None:
    model = tiny_bert()
    lift = prepare(model, LiftConfig(rank=2, lora_rank=1, modules_to_save=("classifier",)))
    requires_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable, total = lift.get_nb_trainable_parameters()
    assert trainable == sum(lift.config.budget(tuple(m.weight.shape)) for m in lift.targets.values()) + 16 * 2 + 2
    assert trainable < requires_grad < total


@pytest.mark.slow
def test_lift_fine_tunes_the_real_minilm_beyond_a_frozen_encoder() -> None:
    from weightlab.experiments._lift_minilm import minilm_demo

    rows = {r["method"]: r for r in minilm_demo(steps=40, n_train=256, n_test=256)}
    assert rows["lift"]["test acc (%)"] > rows["head only"]["test acc (%)"] + 10
