"""Several processes run the same `tunery train` command (`accelerate launch --multi_gpu` on GPUs;
here torchrun, which `accelerate launch` uses underneath, with two CPU processes over gloo): no
code changes, train_batch_size stays the global batch, only the first process writes, and
tokens/s counts every process's tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from peft import PeftModel

from conftest import write_jsonl

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torch's torchrun command is not installed")


def launch(processes: int, *args) -> subprocess.CompletedProcess:
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run([*launcher, "-m", "tunery.cli", "train", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})


def test_two_processes_train_the_same_global_batch_as_one(tmp_path, qa_rows, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows)  # 24 rows: 20 train, 4 validation
    common = ["--base", tiny_model_dir, "--train-data", data, "--num-train-epochs", 1,
              "--num-validation-samples", 4, "--train-batch-size", 4, "--micro-batch-size", 2]
    single = subprocess.run([sys.executable, "-m", "tunery.cli", "train", *map(str, common),
                             "-o", tmp_path / "one", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    double = launch(2, *common, "-o", tmp_path / "two")
    assert double.returncode == 0, double.stderr[-4000:]

    one = json.loads((tmp_path / "one" / "manifest.json").read_text())["metrics"]
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())["metrics"]
    # 20 rows at a global batch of 4: 5 optimizer steps either way (two processes × micro batch 2,
    # no accumulation; one process × micro batch 2, two accumulation steps).
    assert one["steps"] == two["steps"] == 5
    # Every training token once, counted over both processes.
    assert two["real_tokens"] == one["real_tokens"] and two["trained_tokens"] == one["trained_tokens"]
    assert double.stderr.count("done ") == 1  # only the first process reports and writes
    assert two["tokens_per_second"] > 0
    PeftModel.from_pretrained(_base(tiny_model_dir), tmp_path / "two" / "adapter")


def test_a_global_batch_the_processes_cannot_share_is_refused_before_loading(tmp_path, qa_rows, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows)
    proc = launch(2, "--base", tiny_model_dir, "--train-data", data, "--num-validation-samples", 4,
                  "--train-batch-size", 4, "--micro-batch-size", 4, "-o", tmp_path / "r")
    assert proc.returncode != 0
    assert ("train_batch_size (4) is the global batch and must be a multiple of micro_batch_size (4) × 2 "
            "processes, e.g. 8") in proc.stderr
    assert "Traceback" not in proc.stderr.split("train_batch_size (4) is the global batch")[0][-2000:]
    assert not (tmp_path / "r" / "adapter").exists()


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)
