"""The one loop under torchrun: 2 CPU processes (gloo) match 1 process with the same global batch."""

import json
import subprocess
import sys

import pytest
import torch

from weightlab import distributed
from weightlab.errors import WeightlabError

ARGS = ["run", "forgetting", "--profile", "smoke", "--set", "methods=joint", "--set", "seeds=1", "--quiet"]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "weightlab", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_two_gloo_processes_match_one(tmp_path):
    one = torchrun(1, *ARGS, "--out", str(tmp_path / "one"))
    two = torchrun(2, *ARGS, "--out", str(tmp_path / "two"))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    R1 = json.loads((tmp_path / "one" / "results.json").read_text())["records"]["0"]["matrices"]["joint"]
    R2 = json.loads((tmp_path / "two" / "results.json").read_text())["records"]["0"]["matrices"]["joint"]
    mean1, mean2 = sum(R1[-1]) / 5, sum(R2[-1]) / 5
    assert mean1 > 0.8 and abs(mean1 - mean2) < 0.04, (R1[-1], R2[-1])
    # rank 0 alone wrote the run folder: one config, one results file, one checkpoint per stream
    assert len(list((tmp_path / "two" / "checkpoints").glob("*.safetensors"))) == 1
    assert two.stdout.count("results:") == 1


def test_world_size_must_divide_the_batch(tmp_path):
    proc = torchrun(2, *ARGS, "--set", "batch_size=33", "--out", str(tmp_path / "odd"))
    assert proc.returncode != 0
    assert "the torchrun world size 2 does not divide the batch size 33" in proc.stderr


def test_single_process_helpers_are_identities():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    idx = torch.arange(5)
    assert torch.equal(distributed.shard(idx), idx)
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    assert distributed.check_batch(7) == 7


def test_check_batch_message(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(WeightlabError, match="world size 4 does not divide the batch size 6"):
        distributed.check_batch(6)
