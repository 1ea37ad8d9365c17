"""Experiment configs are checked when they are resolved, before any run folder exists; --dry-run and
`weightlab config` show them; every experiment follows the same field rules."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

import pytest
import torch
import yaml

from weightlab import registry
from weightlab.cli import main
from weightlab.data.digits import SIZES
from weightlab.errors import WeightlabError
from weightlab.experiments.configs import (
    Count,
    DigitsSize,
    ExperimentConfig,
    Fraction,
    Range,
    check_fields,
    coerce,
    describe_fields,
    field_types,
    replace_config,
)
from weightlab.experiments.forgetting import ForgettingConfig

NON_IMAGE = {"universality"}  # synthetic teacher–student data: no `data` field
PRETRAINED = {"lift", "tall-masks", "tall-masks-text"}  # a real pretrained network in all or part of it


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@dataclass(frozen=True)
class Demo(ExperimentConfig):
    arms: tuple[Literal["a", "b"], ...] = ("a",)
    rate: Fraction = 0.5
    bits: tuple[Annotated[int, Range(2, 8)], ...] = (2,)
    limit: Count | None = None
    size: DigitsSize = 8


def test_checks_on_construction_name_the_field() -> None:
    with pytest.raises(WeightlabError, match=r"^arms: 'c' is not one of a, b$"):
        Demo(arms=("a", "c"))
    with pytest.raises(WeightlabError, match=r"^rate must be in \(0, 1\), got 1.0$"):
        Demo(rate=1.0)
    with pytest.raises(WeightlabError, match=r"^bits must be in \[2, 8\], got 9$"):
        Demo(bits=(2, 9))
    with pytest.raises(WeightlabError, match=r"^limit must be ≥ 1, got 0$"):
        Demo(limit=0)
    with pytest.raises(WeightlabError, match=r"^seeds must be ≥ 1, got 0$"):
        Demo(seeds=0)
    with pytest.raises(WeightlabError, match=r"^rate=True: expected float$"):
        Demo(rate=True)
    assert Demo(limit=None, size=16).seed_list == [0, 1, 2]
    assert typing.get_args(DigitsSize) == SIZES


def test_command_line_strings_are_parsed_to_the_field_type() -> None:
    hints = field_types(Demo)
    assert coerce("a,b", hints["arms"], key="arms") == ("a", "b")
    assert coerce("3,4", hints["bits"], key="bits") == (3, 4)
    assert coerce("none", hints["limit"], key="limit") is None and coerce("7", hints["limit"], key="limit") == 7
    assert coerce("16", hints["size"], key="size") == 16  # Literal[8, 16, ...] of ints
    with pytest.raises(WeightlabError, match="--set rate='fast': expected a float"):
        coerce("fast", hints["rate"], key="rate")
    changed = replace_config(Demo(), {"arms": "b", "rate": "0.25"})
    assert changed.arms == ("b",) and changed.rate == 0.25
    with pytest.raises(WeightlabError, match="arms: 'z' is not one of a, b"):
        replace_config(Demo(), {"arms": "a,z"})


@pytest.mark.parametrize("pair, message", [
    ("epochs=-1", "epochs must be ≥ 1, got -1"),
    ("methods=finetune,foo", "methods: 'foo' is not one of finetune, replay, joint"),
    ("data=nope", "data: unknown dataset 'nope'; expected one of digits"),
    ("image_size=12", "image_size: digits come at sizes 8, 16, 28, 32, got 12"),
    ("n_tasks=11", "n_tasks must be in [2, 10] (the classes of digits), got 11"),
])
def test_a_bad_value_is_one_line_and_nothing_is_written(capsys, tmp_path, pair, message) -> None:
    code, _, err = run_cli(capsys, "run", "forgetting", "--set", pair, "--out", str(tmp_path / "run"))
    assert code == 2 and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_resolved_config_and_creates_nothing(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "run", "forgetting", "--profile", "smoke", "--set", "epochs=1", "--dry-run")
    assert code == 0 and list(tmp_path.iterdir()) == []
    record = yaml.safe_load(out)
    assert record["experiment"] == "forgetting" and record["profile"] == "smoke"
    assert record["config"]["data"] == "digits" and record["config"]["epochs"] == 1
    assert record["config"]["seeds"] == 2 and record["config"]["methods"] == ["finetune", "replay", "joint"]
    code, out, _ = run_cli(capsys, "run", "lift", "--profile", "full", "--dry-run")
    assert code == 0 and yaml.safe_load(out)["config"]["model"] == "all-minilm-l6-v2"
    assert list(tmp_path.iterdir()) == []


def test_config_command_lists_keys_types_and_defaults(capsys, monkeypatch) -> None:
    from weightlab import cli

    monkeypatch.setattr(cli.console, "width", 200)  # one table row per line
    code, out, _ = run_cli(capsys, "config", "forgetting")
    assert code == 0
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert "int ≥ 1" in lines["epochs"] and "5" in lines["epochs"]
    assert "finetune | replay | joint" in lines["methods"]
    assert "registered dataset" in out and "digits" in lines["data"]
    rows = describe_fields(ForgettingConfig, {"smoke": {"epochs": 2}})
    assert {"key": "epochs", "type": "int ≥ 1", "quick (default)": "5", "smoke": "2"} in rows


@pytest.mark.parametrize("name", registry.names("experiment"))
def test_every_experiment_config_is_checked_and_follows_the_naming_rule(name) -> None:
    spec = registry.get("experiment", name)
    assert issubclass(spec.config, ExperimentConfig)
    fields = {f.name for f in dataclasses.fields(spec.config)}
    assert ("data" in fields) == (name not in NON_IMAGE), "every image experiment has a data field"
    assert ("model" in fields) == (name in PRETRAINED), "an experiment on a pretrained network has a model field"
    for profile in ("smoke", "quick", "full"):
        check_fields(spec.resolve(profile))
    bad = [f for f in fields if re.match(r"^(lr_|ft_|num_)|_lam$|^dataset$", f)]
    assert not bad, f"{name}: fields {bad} break the naming rule (docs/architecture.md)"
    hints = field_types(spec.config)
    for f in fields:  # a choice set is a tuple of Literal, never of free strings
        if typing.get_origin(hints[f]) is tuple and f in ("methods", "variants", "scenarios", "splits",
                                                          "corruptions"):
            assert typing.get_origin(typing.get_args(hints[f])[0]) is Literal, f"{name}.{f}"


@pytest.fixture
def four_class_digits():
    """A registered dataset other than digits (as fashion-mnist will be): digits 0–3 only."""
    from weightlab.data import digits
    from weightlab.data.datasets import DatasetSpec, register_dataset

    def load(split, size, seed):
        data = digits(split, size=size or 8)
        return data.subset(torch.nonzero(data.y < 4).flatten())

    register_dataset(DatasetSpec("test-four-digits", "image", 4, 8, "BSD-3-Clause", "digits 0-3", load))
    yield "test-four-digits"
    registry._REGISTRY["dataset"].pop("test-four-digits")


def test_forgetting_runs_on_another_registered_dataset(tmp_path, four_class_digits) -> None:
    out = tmp_path / "run"
    sets = ["--set", f"data={four_class_digits}", "--set", "n_tasks=2", "--set", "epochs=1"]
    assert main(["run", "forgetting", "--profile", "smoke", *sets, "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["provenance"]["data"]["name"] == four_class_digits
    assert len(results["records"]["0"]["matrices"]["joint"]) == 2  # 4 classes in 2 tasks
    for c in results["claims"]:
        assert c["verdict"] in ("held", "not held", "inconclusive") and c["effect"]["n"] == 2
        assert all(isinstance(v, float) for v in c["effect"]["ci95"])  # two seeds: an interval
