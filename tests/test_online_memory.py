"""benchmarks/online_memory.py, credit_reach.py and memory_probe.py: reports, resume, the reach figure, the probes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import credit_reach  # noqa: E402
import memory_probe  # noqa: E402


def test_credit_reach_counts_rows_that_hold_the_cue():
    """Whole rollouts with a rollout of horizon hold every cue 30 steps back; sequences of 8 without horizon none."""
    whole = dict(algo="ElmurPPO", n_steps=32, batch_size=32, sequence_length=32, memory_horizon=32)
    short = dict(algo="ElmurPPO", n_steps=32, batch_size=32, sequence_length=8, memory_horizon=0)
    assert credit_reach.reach(whole, 30, rollouts=6) == 1.0
    assert credit_reach.reach(short, 30, rollouts=6) == 0.0


def test_online_memory_records_reports_and_resumes(tmp_path):
    out = tmp_path / "om"
    command = [sys.executable, str(BENCHMARKS / "online_memory.py"), "--tasks", "recall-30", "--policies", "ElmurPPO",
               "--seeds", "0", "--budget", "256", "--eval-every", "128", "--jobs", "1", "--out", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    # SB3 trains whole rollouts: 256 steps ask for one, 128 steps of 8 envs
    assert len(runs) == 1 and [steps for steps, _ in runs[0]["curve"]] == list(range(128, 1025, 128))
    assert 0.0 <= runs[0]["final"] <= 1.0 and runs[0]["train_steps_per_s"] > 0
    report = out.with_suffix(".md").read_text()
    assert "## recall-30" in report and "| ElmurPPO | 0 |" in report and "--budget 256" in report
    assert not out.with_suffix(".lock").exists()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "1 of 1 runs already recorded" in again.stdout


def test_online_memory_unfreezes_a_frozen_backbone_at_the_step_given(tmp_path):
    """The diagnosis option ``--unfreeze-backbone-at``: frozen for the first rollout, trained from the second."""
    out = tmp_path / "om"
    command = [sys.executable, str(BENCHMARKS / "online_memory.py"), "--tasks", "recall-30", "--policies", "ElmurPPO",
               "--seeds", "0", "--budget", "2048", "--eval-every", "1024", "--jobs", "1", "--out", str(out),
               "--label", "frozen start", "--policy-kwargs", '{"freeze_backbone": true}', "--unfreeze-backbone-at", "1000"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "recall-30 frozen start seed 0: backbone trains from 1024 steps" in result.stdout  # after the first rollout
    (run,) = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert run["unfreeze_backbone_at"] == 1000
    assert "backbone trains from 1,000 env steps" in out.with_suffix(".md").read_text()
    refused = subprocess.run(command[:-6] + ["--label", "x", "--unfreeze-backbone-at", "1000"], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "--unfreeze-backbone-at needs --policy-kwargs" in refused.stderr


def test_ridge_probe_reads_separable_labels_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(3, size=400)
    noise = rng.normal(size=(400, 16))
    assert memory_probe.ridge_accuracy(noise + 6.0 * np.eye(3, 16)[labels], labels, 3) >= 0.99
    assert memory_probe.ridge_accuracy(noise, labels, 3) < 0.45  # chance is 1/3


def test_memory_probe_records_the_probes_and_leaves_no_lock(tmp_path):
    """An untrained ELMUR (2 slots of 10 steps, alpha 1) already holds the cue at a delay-30 query: the probe the
    diagnosis of online memory rests on (benchmarks/results/memory_probe.md)."""
    out = tmp_path / "probe"
    command = [sys.executable, str(BENCHMARKS / "memory_probe.py"), "--delay", "30", "--budget", "1024",
               "--probe-every", "1024", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run,) = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert [p["steps"] for p in run["probes"]] == [0, 1024]
    untrained = run["probes"][0]
    assert min(untrained["write"]) > 0.9 and min(untrained["held"]) > 0.9 and untrained["grad_ratio"] > 0
    assert abs(untrained["entropy"] - np.log(3)) < 0.01  # an untrained policy is uniform at the query
    assert "## delay 30, defaults, seed 0" in out.with_suffix(".md").read_text()
    assert not out.with_suffix(".lock").exists()
