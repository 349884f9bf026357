"""The README as a new user meets it: every ```python block runs as pasted (its table of defaults:
test_readme_defaults.py), its cheap commands (``--help``) exit 0, and what its commands write stays out of git."""

import argparse
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SCRIPTS = sorted(str(path.relative_to(REPO)) for folder in ("benchmarks", "examples") for path in (REPO / folder).glob("*.py"))

# Training budgets are scaled down by rewriting the first argument of every `.learn(...)` call, a number literal
# such as 150_000, to LEARN_STEPS; nothing else in a snippet changes. For RecurrentPPO that is one rollout (the
# budget is rounded up to n_steps * n_envs), for RecurrentBC LEARN_STEPS gradient steps.
LEARN_CALL = re.compile(r"(\.learn\(\s*)\d[\d_]*")
LEARN_STEPS = 16


def _blocks(language: str) -> List[Tuple[str, str]]:
    """(section heading, code) of every fenced block of ``language`` in the README."""
    blocks = []
    for match in re.finditer(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S):
        headings = re.findall(r"^##+ (.+)$", README[: match.start()], flags=re.M)
        blocks.append((headings[-1] if headings else "top", match.group(1)))
    return blocks


PYTHON_BLOCKS = _blocks("python")
SHELL = "\n".join(code for _, code in _blocks("bash")).replace("\\\n", " ")


def _scaled(code: str) -> str:
    scaled, count = LEARN_CALL.subn(rf"\g<1>{LEARN_STEPS}", code)
    assert count == code.count(".learn("), f"a .learn(...) call without a number literal budget:\n{code}"
    return scaled


def test_readme_has_the_snippets_this_file_runs():
    assert [heading for heading, _ in PYTHON_BLOCKS] == [
        "Use", "ElmurPPO: ELMUR's own algorithm", "Offline training: RecurrentBC", "POPGym",
        "ManiSkill 3 and MIKASA-Robo",
    ]
    assert _scaled("model.learn(150_000, progress_bar=True)") == f"model.learn({LEARN_STEPS}, progress_bar=True)"


class _ThreadsSet(Exception):
    """Raised by the stand-in for ``torch.set_num_threads``: the snippet got there, nothing after it runs."""


class _ModelFirst(Exception):
    """Raised by the stand-in for ``BaseAlgorithm.__init__``: the snippet builds a model before setting threads."""


@pytest.mark.parametrize("heading, code", PYTHON_BLOCKS, ids=[heading for heading, _ in PYTHON_BLOCKS])
def test_snippet_sets_one_torch_thread_before_building_a_model(heading, code, monkeypatch):
    """Run as pasted (as a script: ``__name__ == "__main__"``) up to its call of ``torch.set_num_threads``, which
    must come, with 1, before any SB3 algorithm is built. Small models on CPU: the default thread count made the
    Use snippet 17x slower on a busy 2-core machine."""
    from stable_baselines3.common.base_class import BaseAlgorithm

    calls = []

    def set_num_threads(n: int) -> None:
        calls.append(n)
        raise _ThreadsSet

    def model_first(self, *args, **kwargs) -> None:
        raise _ModelFirst(type(self).__name__)

    monkeypatch.setattr(torch, "set_num_threads", set_num_threads)
    monkeypatch.setattr(BaseAlgorithm, "__init__", model_first)
    try:
        exec(compile(code, f"README.md ({heading})", "exec"), {"__name__": "__main__"})
    except _ThreadsSet:
        pass
    except _ModelFirst as error:
        pytest.fail(f"{heading}: builds a {error} before torch.set_num_threads(1)")
    except ImportError as error:  # an optional extra (popgym, mani_skill) that this machine lacks
        pytest.skip(f"{heading}: {error}")
    assert calls == [1], f"{heading}: torch.set_num_threads calls before the first model: {calls}"


@pytest.mark.parametrize("heading, code", PYTHON_BLOCKS, ids=[heading for heading, _ in PYTHON_BLOCKS])
def test_snippet_runs_as_pasted(heading, code, tmp_path):
    if "popgym" in code:
        pytest.importorskip("popgym")
    if "to_minari" in code:
        pytest.importorskip("minari")
    if "ManiSkillVecEnv" in code:
        from tests.test_maniskill import _maniskill_missing

        if _maniskill_missing():
            pytest.skip(_maniskill_missing())
    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "minari"), PYTHONPATH=str(REPO))
    # A snippet that writes a Minari dataset must also work when pasted again, over what the first run wrote.
    # Both runs share one process (pasted twice into one session), which spares the second import of torch.
    runs = 2 if "to_minari" in code else 1
    runner = f"for run in range({runs}):\n    print('run', run + 1, flush=True)\n    exec({_scaled(code)!r}, {{}})\n"
    result = subprocess.run(
        [sys.executable, "-c", runner], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    last_run = (re.findall(r"^run \d", result.stdout, flags=re.M) or ["no run"])[-1]
    assert result.returncode == 0, f"{heading} ({last_run}):\n{result.stderr[-3000:]}"
    assert last_run == f"run {runs}", result.stdout[-3000:]
    for name in re.findall(r"\.save\(\"([^\"]+)\"\)", code):
        assert (tmp_path / f"{name}.zip").exists(), name


README_MODULES = sorted(set(re.findall(r"python -m (sb3_elmur(?:\.\w+)+)", SHELL)))


def test_readme_names_existing_modules_and_scripts():
    assert README_MODULES == [
        "sb3_elmur.compare", "sb3_elmur.datasets", "sb3_elmur.envs.vulkan", "sb3_elmur.tmaze_eval", "sb3_elmur.zoo"
    ]
    for script in re.findall(r"python ((?:benchmarks|examples)/\w+\.py)", README):
        assert (REPO / script).exists(), script


def _help(monkeypatch, capsys, argv0: str, run) -> Tuple[str, List[argparse.ArgumentParser]]:
    """Run an entry point with ``--help`` in this process; return its output and the parsers it built."""
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recording)
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code in (0, None), f"{argv0} --help exited with {exit_info.value.code}"
    return capsys.readouterr().out, parsers


# In-process runpy of an already imported module warns; `python -m` itself does not.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("module", README_MODULES)
def test_module_help_exits_0(module, monkeypatch, capsys):
    out, _ = _help(monkeypatch, capsys, module, lambda: runpy.run_module(module, run_name="__main__"))
    assert out.startswith("usage:"), out


def _is_sentence(text: str) -> bool:
    text = " ".join(text.split())
    return bool(text) and text[0].isupper() and text.endswith(".")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_is_whole_sentences_with_defaults(script, monkeypatch, capsys):
    out, parsers = _help(monkeypatch, capsys, script, lambda: runpy.run_path(str(REPO / script), run_name="__main__"))
    parser = parsers[0]
    assert out.startswith(f"usage: python {script}"), out.splitlines()[0]
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), script
    assert _is_sentence(parser.description), parser.description
    for action in parser._actions:
        if action.help not in (None, argparse.SUPPRESS) and not isinstance(action, argparse._HelpAction):
            assert _is_sentence(action.help), f"{script} {action.dest}: {action.help!r}"
        elif action.help is None:
            pytest.fail(f"{script}: option {action.dest} has no help text")


def test_script_sets_one_torch_thread():
    # Small models on CPU: more threads only add overhead (and slow every other job on a shared machine).
    for script in SCRIPTS:
        assert "torch.set_num_threads(1)" in (REPO / script).read_text(), script


def _readme_outputs() -> List[str]:
    """Paths, relative to where the commands run, that the README's commands and snippets write."""
    outputs = re.findall(r"(?:\s-f|\s-tb|--out|--tensorboard-log)\s+(\S+)", SHELL)
    outputs += [f"{name}.zip" for _, code in PYTHON_BLOCKS for name in re.findall(r"\.save\(\"([^\"]+)\"\)", code)]
    # Benchmark results are committed on purpose.
    return sorted({path for path in outputs if not path.startswith("benchmarks/results")})


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_gitignore_covers_what_readme_commands_write():
    outputs = _readme_outputs()
    assert {"logs", "tb", "runs/compare", "eval.json", "elmur_tmaze.zip", "bc_tmaze.zip"} <= set(outputs)
    for path in outputs:
        probe = path if Path(path).suffix else f"{path.rstrip('/')}/events.out.tfevents.0"
        result = subprocess.run(["git", "check-ignore", "-q", "--no-index", probe], cwd=REPO)
        assert result.returncode == 0, f"{probe} (written by a README command) is not in .gitignore"
