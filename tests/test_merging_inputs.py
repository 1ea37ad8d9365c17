"""Inputs of a merge: names that differ by a prefix, PEFT LoRA adapter folders, --device, and the store's size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightlab import merging
from weightlab.cli import main
from weightlab.errors import WeightlabError

ENCODER = {"embeddings.word.weight": (10, 4), "encoder.layer.0.query.weight": (4, 4),
           "encoder.layer.0.query.bias": (4,), "pooler.weight": (4, 4)}


def encoder(seed: int, prefix: str = "", head: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = {prefix + k: torch.randn(s, generator=gen) for k, s in ENCODER.items()}
    if head:
        sd.update({"classifier.weight": torch.randn(3, 4, generator=gen), "classifier.bias": torch.zeros(3)})
    return sd


def write(sd: dict, path: Path) -> Path:
    save_file(sd, str(path), metadata={"format": "pt"})
    return path


def fails(args: list[str], capsys, match: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and match in err, err
    return err


def finetune(sd: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in sd.items()}


def test_a_prefix_mismatch_is_named_and_strip_prefix_fixes_it(tmp_path: Path, capsys) -> None:
    raw = encoder(0)
    base = write(raw, tmp_path / "minilm.safetensors")
    tuned = [finetune(encoder(0, "bert.", head=True), s) for s in (1, 2)]
    fts = [write(sd, tmp_path / f"cls{i}.safetensors") for i, sd in enumerate(tuned)]
    out = tmp_path / "merged.safetensors"
    fails(["merge", str(base), *map(str, fts), "--method", "task-arithmetic", "--out", str(out)], capsys,
          "its names carry the prefix 'bert.' that the base's lack: pass --strip-prefix bert.")
    assert main(["merge", str(base), *map(str, fts), "--method", "task-arithmetic", "--strip-prefix", "bert.",
                 "--out", str(out), "--quiet"]) == 0
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and "2 tensor(s) outside the prefix 'bert.' are left out" in warnings[0]
    stripped = [{k.removeprefix("bert."): v for k, v in sd.items() if k.startswith("bert.")} for sd in tuned]
    want = merging.merge(raw, stripped, "task-arithmetic")
    assert all(torch.equal(load_file(str(out))[k], want[k]) for k in raw)


def test_add_prefix_keeps_the_bases_other_tensors(tmp_path: Path, capsys) -> None:
    cls = encoder(0, "bert.", head=True)
    base = write(cls, tmp_path / "cls.safetensors")
    fts = [write(finetune(encoder(0), s), tmp_path / f"raw{s}.safetensors") for s in (1, 2)]
    fails(["merge", str(base), *map(str, fts), "--out", str(tmp_path / "o")], capsys,
          "the base's names carry the prefix 'bert.' that its names lack: pass --add-prefix bert.")
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(base), *map(str, fts), "--method", "task-arithmetic", "--add-prefix", "bert.",
                 "--out", str(out), "--quiet"]) == 0
    assert "they keep the base's values (first: 'classifier." in capsys.readouterr().err
    got = load_file(str(out))
    assert torch.equal(got["classifier.weight"], cls["classifier.weight"])
    assert not torch.equal(got["bert.pooler.weight"], cls["bert.pooler.weight"])


def adapter(folder: Path, tensors: dict, **config: object) -> Path:
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    return folder


def lora_tensors(seed: int = 3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    p = "base_model.model."
    return {p + "encoder.layer.0.query.lora_A.weight": torch.randn(2, 4, generator=gen),
            p + "encoder.layer.0.query.lora_B.weight": torch.randn(4, 2, generator=gen),
            p + "embeddings.word.lora_embedding_A": torch.randn(2, 10, generator=gen),
            p + "embeddings.word.lora_embedding_B": torch.randn(4, 2, generator=gen),
            p + "pooler.weight": torch.randn(4, 4, generator=gen)}


def test_a_lora_adapter_is_a_fine_tune_of_b_a_alpha_over_r(tmp_path: Path) -> None:
    raw = encoder(0)
    base = write(raw, tmp_path / "base.safetensors")
    t = lora_tensors()
    lora = adapter(tmp_path / "lora", t)
    full = finetune(raw, 5)
    p = "base_model.model."
    expected = dict(raw)
    expected["encoder.layer.0.query.weight"] = raw["encoder.layer.0.query.weight"] + 2.0 * (
        t[p + "encoder.layer.0.query.lora_B.weight"] @ t[p + "encoder.layer.0.query.lora_A.weight"])
    expected["embeddings.word.weight"] = raw["embeddings.word.weight"] + 2.0 * (
        t[p + "embeddings.word.lora_embedding_B"] @ t[p + "embeddings.word.lora_embedding_A"]).T
    expected["pooler.weight"] = t[p + "pooler.weight"]
    out = tmp_path / "merged.safetensors"
    merging.merge_checkpoints(base, [lora, write(full, tmp_path / "full.safetensors")], out,
                              merging.MergeConfig(method="task-arithmetic", weights=(1.0, 0.5)))
    want = merging.merge(raw, [expected, full], "task-arithmetic", weights=(1.0, 0.5))
    got = load_file(str(out))
    for k in raw:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    assert torch.equal(got["encoder.layer.0.query.bias"], want["encoder.layer.0.query.bias"])
    # a paper method with unit weights: an adapter input goes through the executor's own global TIES passes
    out = tmp_path / "ties.safetensors"
    merging.merge_checkpoints(base, [lora, tmp_path / "full.safetensors"], out, merging.MergeConfig(density=0.5))
    want = merging.merge(raw, [expected, full], "ties", density=0.5)
    assert all(torch.allclose(load_file(str(out))[k], want[k], atol=1e-6) for k in raw)


def test_lora_scaling_options(tmp_path: Path) -> None:
    from weightlab.methods.merging.checkpoints import Checkpoint, open_source

    base = Checkpoint(write(encoder(0), tmp_path / "base.safetensors"))
    t = {k: v for k, v in lora_tensors().items() if "query" in k}
    q = "base_model.model.encoder.layer.0.query"
    a, b = t[f"{q}.lora_A.weight"], t[f"{q}.lora_B.weight"]
    for name, config, delta in (("rs", {"use_rslora": True}, 4 / 2 ** 0.5 * (b @ a)),
                                ("fifo", {"fan_in_fan_out": True}, 2.0 * (b @ a).T),
                                ("pattern", {"alpha_pattern": {"query": 8}}, 4.0 * (b @ a))):
        ckpt = open_source(adapter(tmp_path / name, t, **config), base)
        assert torch.allclose(ckpt.delta("encoder.layer.0.query.weight"), delta), name


@pytest.mark.parametrize(("change", "config", "match"), [
    (lambda t: t.pop("base_model.model.encoder.layer.0.query.lora_B.weight"), {}, "has lora_A but no lora_B"),
    (lambda t: None, {"r": 3}, "rank r = 3 in adapter_config.json expects lora_A [3, in]"),
    (lambda t: None, {"use_dora": True}, "use_dora adapters are not supported"),
    (lambda t: None, {"peft_type": "IA3"}, "peft_type 'IA3'; weightlab reads LoRA adapters"),
    (lambda t: t.update({"base_model.model.decoder.lora_A.weight": torch.zeros(2, 4),
                         "base_model.model.decoder.lora_B.weight": torch.zeros(4, 2)}), {},
     "patches 'decoder.weight', which the base lacks"),
    (lambda t: t.update({"base_model.model.pooler.weight": torch.zeros(5, 4)}), {},
     "gives 'pooler.weight' the shape [5, 4], the base has float32 [4, 4]"),
    (lambda t: t.update({"base_model.model.pooler.lora_magnitude_vector": torch.zeros(4)}), {},
     "is not a lora_A/lora_B matrix"),
])
def test_bad_adapters_are_one_line_errors(tmp_path: Path, capsys, change, config: dict, match: str) -> None:
    base = write(encoder(0), tmp_path / "base.safetensors")
    t = lora_tensors()
    change(t)
    lora = adapter(tmp_path / "lora", t, **config)
    full = write(finetune(encoder(0), 5), tmp_path / "full.safetensors")
    fails(["merge", str(base), str(lora), str(full), "--out", str(tmp_path / "o")], capsys, match)


def test_a_real_peft_adapter_materialises_as_merge_and_unload(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, num_labels=2)
    torch.manual_seed(0)
    raw = BertModel(config, add_pooling_layer=True)
    write({k: v.contiguous() for k, v in raw.state_dict().items()}, tmp_path / "raw.safetensors")
    cls = BertForSequenceClassification(config)
    cls.bert.load_state_dict(raw.state_dict())
    model = get_peft_model(cls, LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value"],
                                           modules_to_save=["classifier"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    model.save_pretrained(str(tmp_path / "adapter"))
    merged = model.merge_and_unload().state_dict()
    full = {k: v + 0.01 for k, v in merged.items()}  # a full fine-tune: bert.* and the classifier
    write(full, tmp_path / "full.safetensors")
    out = tmp_path / "merged.safetensors"
    inputs = [str(tmp_path / n) for n in ("raw.safetensors", "adapter", "full.safetensors")]
    assert main(["merge", *inputs, "--method", "task-arithmetic", "--strip-prefix", "bert.", "--out", str(out),
                 "--quiet"]) == 0
    base = raw.state_dict()
    encoders = [{k.removeprefix("bert."): v for k, v in sd.items() if k.startswith("bert.")} for sd in (merged, full)]
    want = merging.merge(base, encoders, "task-arithmetic")
    got = load_file(str(out))
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in base)


def test_device(tmp_path: Path, capsys) -> None:
    base = encoder(0)
    fts = [finetune(base, s) for s in (1, 2)]
    paths = [write(sd, tmp_path / f"m{i}.safetensors") for i, sd in enumerate([base, *fts])]
    args = ["merge", *map(str, paths), "--method", "dare-ties", "--density", "0.5", "--device", "cuda", "--out",
            str(tmp_path / "gpu.safetensors"), "--quiet"]
    if not torch.cuda.is_available():
        fails(args, capsys, "--device cuda: no CUDA GPU is available here")
        with pytest.raises(WeightlabError, match="weightlab merges on cpu or cuda"):
            merging.merge(base, fts, device="meta")
        return
    assert main(args) == 0  # the same masks (drawn on the CPU) and the same arithmetic, on the GPU
    want = merging.merge(base, fts, "dare-ties", density=0.5)
    got = load_file(str(tmp_path / "gpu.safetensors"))
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in base)


def test_compress_says_when_the_store_is_larger(tmp_path: Path, capsys) -> None:
    base = encoder(0)
    paths = [write(sd, tmp_path / f"m{i}.safetensors") for i, sd in enumerate([base] + [finetune(base, s)
                                                                                         for s in range(1, 5)])]
    assert main(["compress", *map(str, paths[:3]), "--out", str(tmp_path / "two"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "Gb, larger than the" in captured.out and "of the 2 fine-tuned models (1.03x larger)" in captured.out
    assert "smaller" not in captured.out
    assert "the store is larger than the 2 fine-tuned models it replaces (1.03x)" in captured.err
    assert "smaller only from 3 tasks of these models on" in captured.err
    assert main(["compress", *map(str, paths), "--out", str(tmp_path / "four"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "Gb for the fine-tuned models (1.88x smaller)" in captured.out and captured.err == ""
