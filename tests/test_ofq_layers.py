"""prepare / convert on TinyViT and timm's DeiT, QKR's algebra, the callbacks, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from weightlab.data import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.methods.quant.api import (
    QuantConfig,
    convert,
    load_packed_state,
    packed_state,
    prepare,
    state_nbytes,
)
from weightlab.methods.quant.cga import CGAConfig, ConfidenceGuidedAnnealing, cga_trainable_mask
from weightlab.methods.quant.layers import QuantAttention, QuantLinear
from weightlab.methods.quant.oscillation import OscillationConfig, OscillationTracker
from weightlab.methods.quant.qkr import QKRAttention
from weightlab.models import MLP, TinyViT
from weightlab.train import TrainConfig, train
from weightlab.weights.io import load_tensors, module_bytes, save_tensors


def _vit() -> TinyViT:
    return TinyViT(10, image_size=16, patch_size=4, dim=16, depth=1, num_heads=2)


def _float_weights(attn: nn.Module) -> None:
    """Switch off weight quantization in a prepared attention module (to check the float algebra)."""
    for module in list(attn.modules()):
        if isinstance(module, QuantLinear):
            module.weight_quantizer = nn.Identity()
    if isinstance(attn, QKRAttention):
        attn.qk_quantizer = nn.Identity()


@pytest.mark.parametrize("qkr", [False, True])
def test_attention_replacement_is_exact_without_quantization(qkr: bool) -> None:
    attn = _vit().blocks[0].attn
    with torch.no_grad():
        attn.qkv.bias.normal_()  # QKR must keep the query-bias term that does not cancel in the softmax
    x = torch.randn(3, 5, 16)
    expected = attn(x)
    cls = QKRAttention if qkr else QuantAttention
    replaced = cls(copy.deepcopy(attn), bits_w=8, bits_a=None, method="statsq")
    _float_weights(replaced)
    torch.testing.assert_close(replaced(x), expected, atol=1e-5, rtol=1e-4)


def test_qkr_quantizes_the_query_key_product_per_head() -> None:
    model = prepare(_vit(), QuantConfig(bits_w=2, bits_a=None, qkr=True)).model
    attn = model.blocks[0].attn
    assert isinstance(attn, QKRAttention)
    wq, wk = attn.q_weight.detach().reshape(2, 8, 16), attn.k_weight.detach().reshape(2, 8, 16)
    torch.testing.assert_close(attn.qk_product().reshape(2, 16, 16), wq.transpose(1, 2) @ wk)
    codes = attn.integer_codes()
    assert codes.shape == (32, 16) and set(codes.unique().tolist()) <= {-2.0, -1.0, 0.0, 1.0}
    for row in attn.quantized_qk().reshape(32, 16):  # 4 levels per row: ±0.5, ±1.5 × mean|row of W_qk|
        assert len(row.unique()) <= 4


@pytest.mark.parametrize("config", [QuantConfig(method="lsq"), QuantConfig(),
                                    QuantConfig(bits_w=4, bits_a=None), QuantConfig(qkr=True, bits_w=3)])
def test_prepare_convert_pack_roundtrip(config: QuantConfig, tmp_path) -> None:
    model = _vit()
    float_bytes = module_bytes(model)
    quant = prepare(model, config)
    assert quant.model is model and quant.config == config
    assert all(model.get_submodule(n) is m for n, m in quant.layers.items())
    quantized = [n for n, m in model.named_modules() if hasattr(m, "integer_codes")]
    assert all(any(q == n or q.startswith(f"{n}.") for n in quant.layers) for q in quantized)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.head.bits == 8
    x = torch.rand(4, 1, 16, 16)
    model(x).sum().backward()  # gradients reach the float weights through the quantizers
    assert model.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    model.eval()
    fake = model(x)
    assert quant.convert() is model
    assert model.blocks[0].mlp.fc1.int_weight.codes.dtype == torch.int8
    torch.testing.assert_close(model(x), fake)
    state = quant.packed_state()
    assert state.keys() == packed_state(model).keys()
    save_tensors(state, tmp_path / "q.safetensors")
    assert state_nbytes(state) < float_bytes / 2
    reloaded = load_packed_state(copy.deepcopy(model), load_tensors(tmp_path / "q.safetensors"))
    torch.testing.assert_close(reloaded(x), fake)


def test_prepare_timm_deit() -> None:
    timm = pytest.importorskip("timm")
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10)
    prepare(deit, QuantConfig(bits_w=2, bits_a=2, qkr=True))
    assert sum(isinstance(m, QKRAttention) for m in deit.modules()) == 2
    assert isinstance(deit.blocks[1].mlp.fc2, QuantLinear) and deit.head.bits == 8
    x = torch.rand(2, 3, 32, 32)
    deit(x).sum().backward()
    deit.eval()
    fake = deit(x)
    torch.testing.assert_close(convert(deit)(x), fake)


def test_tracker_and_cga_in_the_training_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(64, 1, 16, 16, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    model = prepare(_vit(), QuantConfig(bits_w=2, bits_a=2, qkr=True)).model
    tracker = OscillationTracker(model, OscillationConfig(skip=("head",)))
    assert "head" not in tracker.modules and "blocks.0.attn" in tracker.modules
    config = TrainConfig(max_steps=6, batch_size=16, lr=0.05, optimizer="adamw", weight_decay=0.5)
    train(model, data, config, callbacks=[tracker])
    assert len(tracker.history) == 6 and 0 <= tracker.oscillating_fraction() <= 1
    assert tracker.flips > 0  # at lr 0.05 codes do change

    fc1 = model.blocks[0].mlp.fc1
    before = fc1.weight.detach().clone()
    frozen = ~cga_trainable_mask(before, 2, 0.05)
    cga = ConfidenceGuidedAnnealing(model, CGAConfig(boundary_range=0.05))
    assert "blocks.0.attn.v" in cga.layers and "head" not in cga.layers  # q, k are not frozen under QKR
    train(model, data, TrainConfig(max_steps=1, batch_size=16, lr=0.05, optimizer="adamw", weight_decay=0.5),
          callbacks=[cga, tracker])
    after = fc1.weight.detach()
    assert torch.equal(after[frozen], before[frozen])  # frozen: untouched despite lr and weight decay
    assert not torch.equal(after[~frozen], before[~frozen])
    assert 0 < cga.trainable_fraction[0] < 0.5 and len(tracker.history) == 7


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"bits_w": 0}, "bits_w must be an integer from 1 to 8, got 0"),
    ({"bits_w": 9}, "bits_w must be an integer from 1 to 8, got 9"),
    ({"bits_a": 12}, "bits_a must be an integer from 1 to 8, got 12"),
    ({"method": "dorefa"}, "method must be one of lsq, statsq, got 'dorefa'"),
    ({"method": "lsq", "bits_w": 1}, "signed LSQ needs bits ≥ 2"),
])
def test_quant_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(WeightlabError, match=message):
        QuantConfig(**kwargs)


def test_prepare_without_linear_layers_says_so() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(WeightlabError, match=r"Sequential has no nn.Linear layers to quantize .*Conv2d, "):
        prepare(model, QuantConfig())


def test_qkr_without_attention_names_what_was_found() -> None:
    with pytest.raises(WeightlabError, match=r"MLP has none \(Linear layers: body.1, body.3, head"):
        prepare(MLP(64, 10, hidden=(8, 8)), QuantConfig(qkr=True))


def test_callbacks_and_convert_need_a_prepared_model() -> None:
    with pytest.raises(WeightlabError, match="no quantized layers to track"):
        OscillationTracker(_vit())
    with pytest.raises(WeightlabError, match="no quantized layers"):
        convert(_vit())
    with pytest.raises(WeightlabError, match="CGA needs StatsQ-quantized layers"):
        ConfidenceGuidedAnnealing(prepare(_vit(), QuantConfig(method="lsq")).model)
    with pytest.raises(WeightlabError, match="boundary_range must be in"):
        CGAConfig(boundary_range=0.0)
    model = prepare(_vit(), QuantConfig()).model
    with pytest.raises(WeightlabError, match="already prepared"):
        prepare(model, QuantConfig())


def test_the_package_exports_what_the_readme_promises() -> None:
    import weightlab.methods.quant as quant

    assert quant.prepare is prepare and quant.convert is convert and quant.QuantConfig is QuantConfig
    assert {"OscillationTracker", "ConfidenceGuidedAnnealing", "CGAConfig", "packed_state",
            "Quantized"} <= set(quant.__all__)
