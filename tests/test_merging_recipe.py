"""``weightlab merge --config recipe.yml``: mergekit's recipe format, checked strictly, with provenance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from weightlab import merging
from weightlab.cli import main
from weightlab.weights.stream_io import SafetensorsReader

N_MODELS = 3


def state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(6, 5, generator=gen), "layer.bias": torch.randn(6, generator=gen),
            "norm.weight": torch.randn(5, generator=gen).bfloat16(), "position_ids": torch.arange(4)}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A folder with models/base and models/ft0..2 (Hugging Face folders with a config.json)."""
    base = state(0)
    for name, sd in [("base", base)] + [(f"ft{i}", {k: (v.float() + 0.1 * state(i + 1)[k].float()).to(v.dtype)
                                                    if v.is_floating_point() else v for k, v in base.items()})
                                        for i in range(N_MODELS)]:
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "torch_dtype": "float32"}))
    return tmp_path


def load(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def models(root: Path) -> tuple[dict, list[dict]]:
    return load(root / "models/base"), [load(root / f"models/ft{i}") for i in range(N_MODELS)]


def run(root: Path, text: str, out: str = "out", *extra: str) -> Path:
    (root / "recipe.yml").write_text(text)
    assert main(["merge", "--config", str(root / "recipe.yml"), "--out", str(root / out), "--quiet", *extra]) == 0
    return root / out


def models_block(params: list[str], *, base: bool = False) -> str:
    names = (["base"] if base else []) + [f"ft{i}" for i in range(N_MODELS)]
    return "models:\n" + "".join(f"  - model: models/{n}\n" + (f"    parameters: {{{p}}}\n" if p else "")
                                 for n, p in zip(names, params))


def test_task_arithmetic_recipe_is_the_formula(root: Path) -> None:
    out = run(root, "merge_method: task_arithmetic\nbase_model: models/base\n"
              + models_block(["weight: 1.0", "weight: -0.5", "weight: 0.7"])
              + "parameters: {lambda: 1.3}\ndtype: float32\n")
    base, fts = models(root)
    got = load(out)
    for k, v in base.items():
        if not v.is_floating_point():
            assert torch.equal(got[k], v)
            continue
        b = v.float()
        weighted = torch.stack([w * (ft[k].float() - b) for w, ft in zip([1.0, -0.5, 0.7], fts)])
        assert got[k].dtype == torch.float32 and torch.equal(got[k], b + 1.3 * weighted.sum(dim=0)), k


def mergekit_ties(base: torch.Tensor, fts: list[torch.Tensor], weights: list[float], densities: list[float]):
    """mergekit's TIES, written out: exactly ⌊ρn⌋ largest kept, weighted, sign election (0 → +), weighted mean."""
    b = base.float().reshape(-1)
    deltas = []
    for ft, density in zip(fts, densities):
        d = ft.float().reshape(-1) - b
        keep = torch.zeros_like(d)
        keep[torch.argsort(d.abs(), descending=True)[: max(1, int(density * d.numel()))]] = 1
        deltas.append(d * keep)
    w = torch.tensor(weights).reshape(-1, 1)
    weighted = torch.stack(deltas) * w
    sign = (weighted.sum(dim=0) >= 0).float() * 2 - 1
    agree = (weighted.sign() == sign).float()
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return (b + (weighted * agree).sum(dim=0) / divisor).reshape(base.shape)


def test_ties_recipe_is_mergekit_ties(root: Path) -> None:
    out = run(root, "merge_method: ties\nbase_model: models/base\n"
              + models_block(["weight: 1.0, density: 0.3", "weight: 0.5, density: 0.6", "weight: 2.0, density: 0.5"])
              + "parameters: {normalize: true, int8_mask: true}\ndtype: float32\n")
    base, fts = models(root)
    got = load(out)
    for k in ("layer.weight", "layer.bias", "norm.weight"):
        want = mergekit_ties(base[k], [ft[k] for ft in fts], [1.0, 0.5, 2.0], [0.3, 0.6, 0.5])
        assert torch.equal(got[k], want), k


def test_linear_recipe_without_a_base_and_with_the_base_listed(root: Path) -> None:
    text = models_block(["weight: 1.0", "weight: 2.0", "weight: 3.0", "weight: 4.0"], base=True)
    out = run(root, "merge_method: linear\n" + text)
    base, fts = models(root)
    got = load(out)
    for k in ("layer.weight", "norm.weight"):
        stack = torch.stack([m[k].float() for m in [base, *fts]])
        want = (stack * torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(-1, *[1] * base[k].dim())).sum(0) / 10
        assert torch.allclose(got[k].float(), want.to(base[k].dtype).float(), atol=0, rtol=1e-6), k


def test_weightlab_methods_in_the_same_format(root: Path) -> None:
    base, fts = models(root)
    out = run(root, "merge_method: consensus-ta\nbase_model: models/base\n"
              + models_block(["lam: 0.3", "lam: 0.4", "lam: 0.5"]) + "parameters: {k: 1, alpha: 0.8}\n", "cons")
    want = merging.merge(base, fts, "consensus-ta", k=1, lambdas=(0.3, 0.4, 0.5), alpha=0.8)
    assert all(torch.equal(load(out)[k], want[k]) for k in base)
    out = run(root, "merge_method: dare_ties\nbase_model: models/base\n" + models_block(["weight: 1", "", ""])
              + "parameters: {density: 0.4, seed: 7}\n", "dare")
    want = merging.merge(base, fts, "dare-ties", density=0.4, seed=7)
    assert all(torch.equal(load(out)[k], want[k]) for k in base)
    out = run(root, "merge_method: slerp\nbase_model: models/base\nmodels:\n  - model: models/base\n"
              "  - model: models/ft1\nparameters: {t: 0.25}\n", "slerp")
    want = merging.merge(base, [fts[1]], "slerp", t=0.25)
    assert all(torch.equal(load(out)[k], want[k]) for k in base)


def test_tall_masks_recipe_writes_a_store(root: Path) -> None:
    text = ("merge_method: tall-masks\nbase_model: models/base\nmodels:\n"
            + "".join(f"  - model: models/ft{i}\n    name: task{i}\n    parameters: {{lam: 0.3}}\n" for i in range(3))
            + "parameters: {merge: ties, density: 0.5}\n")
    store = run(root, text, "store")
    manifest = merging.read_manifest(store)
    assert manifest["tasks"] == ["task0", "task1", "task2"] and manifest["merge"] == "ties"
    recorded = yaml.safe_load((store / "merge_config.yaml").read_text())
    assert recorded["merge_method"] == "tall-masks" and recorded["parameters"]["density"] == 0.5
    assert main(["extract", str(store), "--task", "task1", "--out", str(root / "t1"), "--quiet"]) == 0
    record = yaml.safe_load((root / "t1" / "merge_config.yaml").read_text())
    assert record["extract"]["task"] == "task1" and record["extract"]["lam"] == 0.3
    assert (root / "t1" / "README.md").read_text().startswith("---\n")


def test_merged_folder_carries_a_recipe_that_runs_again(root: Path, capsys) -> None:
    out = run(root, "merge_method: ties\nbase_model: models/base\n"
              + models_block(["weight: 1.0, density: 0.5", "weight: -1.0, density: 0.5", "weight: 0.5"])
              + "parameters: {lambda: 2.0}\ndtype: bfloat16\n")
    recorded = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert recorded["parameters"] == {"alpha": 2.0, "scope": "tensor", "normalize": True, "convention": "mergekit"}
    assert [m["parameters"] for m in recorded["models"]] == [
        {"weight": 1.0, "density": 0.5}, {"weight": -1.0, "density": 0.5}, {"weight": 0.5, "density": 1.0}]
    digests = {i["path"]: i["sha256"] for i in recorded["provenance"]["inputs"]}
    assert set(digests) == {"models/base", "models/ft0", "models/ft1", "models/ft2"}
    assert len(digests["models/ft0"]["model.safetensors"]) == 64
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {v.dtype for k, v in load(out).items() if k != "position_ids"} == {torch.bfloat16}
    card = (out / "README.md").read_text()
    assert "method **ties**" in card and "`models/ft1` | weight=-1.0, density=0.5" in card
    shutil.copy(out / "merge_config.yaml", root / "again.yml")
    capsys.readouterr()
    assert main(["merge", "--config", str(root / "again.yml"), "--out", str(root / "again"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # the inputs are unchanged: no warning
    assert (root / "again/model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    save_file(state(9), str(root / "models/ft2/model.safetensors"))
    assert main(["merge", "--config", str(root / "again.yml"), "--out", str(root / "changed"), "--quiet"]) == 0
    assert "input 'models/ft2' has changed since the recipe was written" in capsys.readouterr().err


def test_single_file_output_carries_the_recipe_in_its_metadata(root: Path) -> None:
    for name in ["base", "ft0", "ft1"]:
        shutil.copy(root / f"models/{name}/model.safetensors", root / f"{name}.safetensors")
    out = run(root, "merge_method: task-arithmetic\nbase_model: base.safetensors\nmodels:\n"
              "  - model: ft0.safetensors\n  - model: ft1.safetensors\nparameters: {alpha: 0.5}\n", "o.safetensors")
    metadata = SafetensorsReader(out).metadata
    assert metadata["format"] == "pt"
    recorded = yaml.safe_load(metadata["merge_config"])
    assert recorded["merge_method"] == "task-arithmetic" and recorded["parameters"]["alpha"] == 0.5


@pytest.mark.parametrize(("text", "match"), [
    ("merge_method: ties\nbase_model: models/base\nmodel: []\n", "unknown key 'model' in the recipe"),
    ("merge_method: ties\nslices: []\n", "'slices' (a mergekit feature) is not supported"),
    ("merge_method: tie\nbase_model: models/base\nmodels: [{model: models/ft0}]\n", "closest: ties"),
    ("merge_method: ties\nbase_model: models/base\nmodels: [{model: models/ft0, parameters: {weigth: 1}}]\n",
     "unknown parameter 'weigth' in models[0].parameters"),
    ("merge_method: ties\nbase_model: models/base\nmodels: [{model: models/ft0, parameters: {weight: abc}}]\n",
     "models[0].parameters.weight must be a number, got 'abc'"),
    ("merge_method: ties\nbase_model: models/base\nmodels: [{model: models/ft0}]\nparameters: {normalize: 1}\n",
     "parameters.normalize must be true or false"),
    ("merge_method: ties\nbase_model: models/base\nmodels: [{model: models/ft0}]\nparameters: {density: [0.1, 1]}\n",
     "a per-layer gradient or filter"),
    ("merge_method: ties\nbase_model: models/base\nmodels:\n  - model: models/ft0\n    parameters:\n"
     "      weight: [{filter: mlp, value: 1}]\n", "a per-layer gradient or filter"),
    ("merge_method: ties\nbase_model: ../outside\nmodels: [{model: models/ft0}]\n", "leaves its folder"),
    ("merge_method: ties\nbase_model: /etc\nmodels: [{model: models/ft0}]\n", "leaves its folder"),
    ("merge_method: ties\nbase_model: models/base\nmodels: [{model: models/ft0}]\nparameters: {alpha: 1, lambda: 1}\n",
     "both alpha and lambda"),
    ("merge_method: ties\nbase_model: models/base\nmodels: [{model: models/ft0, parameters: {t: 0.5}}]\n",
     "models[0].parameters.t is one value for the whole merge"),
    ("merge_method: ties\nbase_model: models/base\nmodels: [{model: models/ft0}]\ndtype: int8\n",
     "dtype must be one of"),
    ("merge_method: ties\nbase_model: models/base\nmodels: models/ft0\n", "models must be a non-empty list"),
    ("merge_method: ties\nbase_model: models/base\n", "lacks models"),
    ("merge_method: ties\nmodels: [{model: models/ft0}, {model: models/ft1}]\n", "ties needs a base_model"),
    ("merge_method: ties\nbase_model: models/base\nmodels: [{model: models/ft0, name: a}]\n",
     "read by tall-masks only"),
    ("merge_method: [ties\n", "not valid YAML (line 2): expected ',' or ']'"),
    ("- ties\n", "expected a mapping with merge_method and models, got list"),
    ("merge_method: slerp\nbase_model: models/base\nmodels: [{model: models/ft0}, {model: models/ft1}]\n",
     "slerp merges the base with exactly 1 fine-tuned model(s), got 2"),
    ("merge_method: ties\nbase_model: models/base\nmodels: [{model: models/nope}, {model: models/ft1}]\n",
     "does not exist"),
])
def test_bad_recipes_exit_2_with_one_line(root: Path, capsys, text: str, match: str) -> None:
    (root / "recipe.yml").write_text(text)
    assert main(["merge", "--config", str(root / "recipe.yml"), "--out", str(root / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and match in err, err
    assert not (root / "o").exists()


def test_config_takes_no_models_or_method_flags(root: Path, capsys) -> None:
    (root / "recipe.yml").write_text("merge_method: linear\nmodels: [{model: models/ft0}, {model: models/ft1}]\n")
    for extra, match in ((["--alpha", "2"], "remove --alpha"), ([str(root / "models/base")], "remove ")):
        assert main(["merge", *extra, "--config", str(root / "recipe.yml"), "--out", str(root / "o")]) == 2
        assert match in capsys.readouterr().err
    assert main(["merge", "--out", str(root / "o")]) == 2
    assert "Missing argument" in capsys.readouterr().err


def test_parameters_a_method_does_not_read_are_warned(root: Path, capsys) -> None:
    run(root, "merge_method: task_arithmetic\nbase_model: models/base\n" + models_block(["density: 0.5", "", ""]))
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "parameter 'density' is not read by task-arithmetic; it is read by ties, dare-ta" in line
