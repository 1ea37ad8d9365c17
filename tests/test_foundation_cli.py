"""The command line: bad input gives one line and exit status 2; runs write their folder; --resume."""

import json
import subprocess
import sys

import pytest

from weightlab import registry
from weightlab.cli import main
from weightlab.experiments.base import run_experiment
from weightlab.runs import RunContext


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_shows_experiments(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "forgetting" in out


def test_unknown_experiment_lists_closest(capsys):
    code, _, err = run_cli(capsys, "run", "forgeting")
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert "unknown experiment 'forgeting'" in err and "closest: forgetting" in err


def test_unknown_set_key_names_valid_keys(capsys):
    code, _, err = run_cli(capsys, "run", "forgetting", "--set", "epoch=3")
    assert code == 2
    assert "unknown --set key 'epoch'" in err and "valid keys:" in err and "epochs" in err


@pytest.mark.parametrize("pair, expected", [("epochs=three", "epochs='three': expected an int"),
                                            ("lr=fast", "lr='fast': expected a float")])
def test_wrong_type_names_expected_type(capsys, pair, expected, tmp_path):
    code, _, err = run_cli(capsys, "run", "forgetting", "--set", pair, "--out", str(tmp_path / "x"))
    assert code == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_malformed_set(capsys):
    code, _, err = run_cli(capsys, "run", "forgetting", "--set", "epochs")
    assert code == 2 and "key=value" in err


def test_unknown_profile(capsys):
    code, _, err = run_cli(capsys, "run", "forgetting", "--profile", "huge")
    assert code == 2 and "unknown profile 'huge'" in err


def test_existing_output_folder_needs_resume(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "forgetting", "--out", str(tmp_path))
    assert code == 2 and "already exists" in err and "--resume" in err


def test_resume_without_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "forgetting", "--resume", "--out", str(tmp_path / "none"))
    assert code == 2 and "no config.yaml" in err


def test_show_needs_a_run_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "show", str(tmp_path))
    assert code == 2 and "not a finished run directory" in err


def test_console_script_exit_status_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "weightlab", "run", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown experiment 'nope'") and "Traceback" not in proc.stderr


def test_run_and_show(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "run", "forgetting", "--profile", "smoke", "--out", str(out), "--quiet")
    assert code == 0 and str(out) in stdout
    for name in ("config.yaml", "results.json", "results.md", "plots/accuracy_matrix_finetune.png"):
        assert (out / name).is_file()
    code, stdout, _ = run_cli(capsys, "show", str(out))
    assert code == 0 and "Claims" in stdout


def test_run_all_writes_claim_summary(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = registry.names
    monkeypatch.setattr(registry, "names", lambda kind: ["forgetting"] if kind == "experiment" else names(kind))
    code, stdout, _ = run_cli(capsys, "run", "all", "--profile", "smoke", "--quiet")
    assert code == 0
    summary = (tmp_path / "runs" / "summary-smoke.md").read_text()
    assert "forgetting" in summary and "finetune forgets" in summary


def test_interrupted_run_resumes_to_identical_numbers(tmp_path, monkeypatch):
    sets = {"seeds": "1", "epochs": "1", "methods": "finetune,replay"}
    _, reference = run_experiment("forgetting", profile="smoke", out=tmp_path / "ref", overrides=sets)

    original = RunContext.save_state

    def crash_after_three(self, *args, **kwargs):
        if self.saves == 3:  # interrupted after three of finetune's five experiences
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RunContext, "save_state", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("forgetting", profile="smoke", out=tmp_path / "cut", overrides=sets)
    monkeypatch.setattr(RunContext, "save_state", original)
    assert not (tmp_path / "cut" / "results.json").exists()
    _, resumed = run_experiment("forgetting", profile="smoke", out=tmp_path / "cut", overrides=sets, resume=True)
    assert resumed.records == reference.records
    ref_json = json.loads((tmp_path / "ref" / "results.json").read_text())
    cut_json = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert ref_json == cut_json


def test_resume_refuses_a_changed_config(tmp_path):
    from weightlab.errors import WeightlabError

    run_experiment("forgetting", profile="smoke", out=tmp_path / "r", overrides={"methods": "finetune"})
    with pytest.raises(WeightlabError, match="differs.*epochs"):
        run_experiment("forgetting", profile="smoke", out=tmp_path / "r",
                       overrides={"methods": "finetune", "epochs": "9"}, resume=True)


def test_state_keys_never_share_a_file(tmp_path):
    import torch

    ctx = RunContext(tmp_path)
    ctx.save_state("split/rnn-hnet+/seed0", {"a": torch.ones(1)}, {"which": "plus"})
    ctx.save_state("split/rnn-hnet/seed0", {"a": torch.zeros(1)}, {"which": "plain"})
    assert ctx.load_state("split/rnn-hnet+/seed0")[1] == {"which": "plus"}
    assert ctx.load_state("split/rnn-hnet/seed0")[1] == {"which": "plain"}
