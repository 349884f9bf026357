"""``benchmarks/gpu_check.py``: its dry run (the GPU check's code on the CPU: CPU simulation, one env, tiny) writes
every section of the report; a failed or starved section is recorded and the others still run. The dry run takes about
a minute (two ManiSkill CPU workers start, and ElmurPPO and RecurrentPPO train two iterations in each mode)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from tests.test_maniskill import needs_maniskill

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "benchmarks" / "gpu_check.py")


def _run(args: List[str], timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@needs_maniskill
def test_dry_run_writes_every_section(tmp_path):
    """The whole check on the CPU. Slow (75 s): run it before a device session, with ``pytest -m slow -k dry_run``."""
    out = tmp_path / "gpu_check.md"
    result = _run(["--dry-run", "--out", str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out.read_text()
    assert report.startswith("# GPU check (dry run)\n\nCommand: `python benchmarks/gpu_check.py --dry-run --out ")
    assert "(code " in report and "dry run: CPU simulation" in report and "failed" not in report
    assert re.findall(r"^## (.+)$", report, flags=re.M) == [
        "CUDA tests (passed)",
        "RememberColor3-v0, RGB + joints at 36 x 36, 1 CPU-simulated env (passed)",
        "RememberColor3-v0, plain state, 1 CPU-simulated env (passed)",
    ]
    assert "`python -m pytest -m cuda " in report and "SKIPPED" in report  # no CUDA here
    rgb, state = report.split("\n## ")[2:]
    for section, policies in ((rgb, ("MultiInputElmurPolicy", "MultiInputLstmPolicy")),
                              (state, ("ElmurPolicy", "MlpLstmPolicy"))):
        rows = re.findall(r"^\| (.+?) \| ([\d,.]+) \| ([\d,.]+) \| ([\d,.]+) \| [\d.]+ GiB \|$", section, flags=re.M)
        assert [row[0] for row in rows] == [f"ElmurPPO + {policies[0]}", f"RecurrentPPO + {policies[1]}"]
        acting = re.findall(r"^\| (.+?) \| [\d.]+ \| [\d,]+ \| [\d.]+ \|$", section, flags=re.M)
        assert acting == ["eager", "CUDA graphs (reduce-overhead)", "compile_acting=True"]
    record = json.loads(out.with_suffix(".json").read_text())
    assert list(record["sections"]) == ["tests", "rgb+joints", "state"] and record["size"]["sim_backend"] == "cpu"
    assert not list(tmp_path.glob(".*.json"))  # the sections' partial results are gone
    refused = _run(["--dry-run", "--out", str(out)], timeout=120)
    assert refused.returncode == 2 and "exists: pass --overwrite" in refused.stderr


@needs_maniskill
def test_a_failed_section_is_recorded_and_the_next_one_runs(tmp_path):
    out = tmp_path / "gpu_check.md"
    result = _run(["--dry-run", "--out", str(out), "--sections", "state", "rgb+joints", "--task", "NoSuchTask-v9"])
    assert result.returncode == 1
    report = out.read_text()
    assert re.findall(r"^## (.+)$", report, flags=re.M) == [
        "NoSuchTask-v9, plain state, 1 CPU-simulated env (failed)",
        "NoSuchTask-v9, RGB + joints at 36 x 36, 1 CPU-simulated env (failed)",
    ]
    assert report.count("- env: **failed**, ") == 2 and "neither a ManiSkill nor a MIKASA-Robo task" in report


def test_a_section_without_time_left_is_skipped(tmp_path):
    out = tmp_path / "gpu_check.md"
    result = _run(["--dry-run", "--out", str(out), "--budget", "1"], timeout=120)
    assert result.returncode == 1
    assert re.findall(r"^## .+? \((.+)\)$", out.read_text(), flags=re.M) == ["skipped: out of time (0 s left)"] * 3


@pytest.mark.parametrize("args, message", [([], "needs a CUDA device"), (["--sections", "gpu"], "invalid choice")])
def test_bad_invocations_are_refused(tmp_path, args, message):
    import torch

    if not args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _run(["--out", str(tmp_path / "report.md"), *args], timeout=120)
    assert result.returncode == 2 and message in result.stderr
