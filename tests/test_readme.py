"""The README as a new user meets it: every ```python block, saved to a file and run with ``python file.py`` as a user
runs it, works and prints what the README says it prints (its table of defaults: test_readme_defaults.py), its cheap
commands (``--help``) exit 0, and what its commands write stays out of git.

CI runs the snippets with scaled-down budgets (``_scaled``: one rollout or a few gradient steps instead of minutes
of training), so it checks that each snippet runs and prints its evaluation line in the stated form, not the
numbers it reaches: those the README states from full runs."""

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
# The files meant to be run (a `__main__` guard), not the modules they share (benchmarks/reports.py)
SCRIPTS = sorted(str(path.relative_to(REPO)) for folder in ("benchmarks", "examples") for path in (REPO / folder).glob("*.py")
                 if 'if __name__ == "__main__":' in path.read_text())

# Training budgets are scaled down by rewriting the first argument of every `.learn(...)` call, a number literal
# such as 150_000, to LEARN_STEPS, the number of episodes of `make_tmaze_dataset(...)` to DATASET_EPISODES, and
# the rounds of a training loop, `for _ in range(20):`, to ROUNDS, and the steps of `evaluate_success(...,
# max_steps=100)` to EVAL_STEPS (unfinished episodes count as failures); nothing else in a snippet changes. For RecurrentPPO that is one rollout (the budget is rounded up to
# n_steps * n_envs), for RecurrentBC LEARN_STEPS gradient steps.
LEARN_CALL = re.compile(r"(\.learn\(\s*)\d[\d_]*")
LEARN_STEPS = 16
DATASET_CALL = re.compile(r"(make_tmaze_dataset\(\s*)\d[\d_]*")
DATASET_EPISODES = 64
ROUNDS_LOOP = re.compile(r"(for _ in range\()\d+")
ROUNDS = 2
EVAL_STEPS_ARG = re.compile(r"(max_steps=)\d[\d_]*")
EVAL_STEPS = 2
# A number in a printed result (success 1.00, return -0.45, 40,960 env steps): what a scaled run prints differently.
RESULT_NUMBER = re.compile(r"[-+]?\d[\d,]*(\.\d+)?")


def _blocks(language: str) -> List[Tuple[str, str]]:
    """(section heading, code) of every fenced block of ``language`` in the README."""
    return [(heading, code) for heading, code, _ in _blocks_with_notes(language)]


def _blocks_with_notes(language: str) -> List[Tuple[str, str, str]]:
    """(section heading, code, the paragraph right after the block) of every fenced block of ``language``."""
    blocks = []
    for match in re.finditer(rf"^```{language}\n(.*?)^```\n", README, flags=re.M | re.S):
        headings = re.findall(r"^##+ (.+)$", README[: match.start()], flags=re.M)
        note = README[match.end():].lstrip("\n").split("\n\n", 1)[0]
        blocks.append((headings[-1] if headings else "top", match.group(1), note))
    return blocks


PYTHON_BLOCKS = _blocks("python")
PYTHON_NOTES = {heading: note for heading, _, note in _blocks_with_notes("python")}
SHELL = "\n".join(code for _, code in _blocks("bash")).replace("\\\n", " ")


def _scaled(code: str) -> str:
    scaled, count = LEARN_CALL.subn(rf"\g<1>{LEARN_STEPS}", code)
    assert count == code.count(".learn("), f"a .learn(...) call without a number literal budget:\n{code}"
    scaled = DATASET_CALL.sub(rf"\g<1>{DATASET_EPISODES}", scaled)
    scaled = ROUNDS_LOOP.sub(rf"\g<1>{ROUNDS}", scaled)
    return EVAL_STEPS_ARG.sub(rf"\g<1>{EVAL_STEPS}", scaled)


def _promised_lines(heading: str) -> List[str]:
    """The lines the README says a snippet prints: the `...` quotes right after "prints" in the paragraph that follows
    it (`a`, `b` and `c`)."""
    note = PYTHON_NOTES[heading]
    assert re.match(r"(Runs|Takes) about \d+(-\d+)? (s|min)\b", note), (
        f"the paragraph after the {heading!r} snippet must start with how long it runs: {note[:200]!r}"
    )
    assert "prints" in note, f"the paragraph after the {heading!r} snippet must say what it prints: {note[:200]!r}"
    quotes = re.search(r"prints ((?:`[^`]+`(?:,? and |, )?)+)", " ".join(note.split()))
    assert quotes, f"the paragraph after the {heading!r} snippet must quote what it prints: {note[:200]!r}"
    return re.findall(r"`([^`]+)`", quotes.group(1))


def test_readme_has_the_snippets_this_file_runs():
    assert [heading for heading, _ in PYTHON_BLOCKS] == [
        "Use", "ElmurPPO: ELMUR's own algorithm", "Offline training: RecurrentBC", "POPGym",
        "ManiSkill 3 and MIKASA-Robo",
    ]
    assert _scaled("model.learn(150_000, progress_bar=True)") == f"model.learn({LEARN_STEPS}, progress_bar=True)"
    assert _scaled("make_tmaze_dataset(2000)") == f"make_tmaze_dataset({DATASET_EPISODES})"
    assert _scaled("for _ in range(20):") == f"for _ in range({ROUNDS}):"
    assert _scaled("evaluate_success(model, env, max_steps=100)") == f"evaluate_success(model, env, max_steps={EVAL_STEPS})"


@pytest.mark.parametrize("heading, code", PYTHON_BLOCKS, ids=[heading for heading, _ in PYTHON_BLOCKS])
def test_snippet_is_seeded_and_states_its_time_and_result(heading, code):
    # Unseeded, the Use snippet's model scored 0.00 greedy in one run and 1.00 in another.
    assert "seed=0" in code, heading
    assert _promised_lines(heading), heading


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
    """Saved to a file and run as ``python snippet.py`` (a snippet that starts worker processes needs its own
    ``if __name__ == "__main__":`` guard then, as a user's script does), scaled down (``_scaled``)."""
    if "popgym" in code:
        pytest.importorskip("popgym")
    if "to_minari" in code:
        pytest.importorskip("minari")
    if "ManiSkillVecEnv" in code:
        from tests.test_maniskill import _maniskill_missing

        if _maniskill_missing():
            pytest.skip(_maniskill_missing())
    script = tmp_path / "snippet.py"
    script.write_text(_scaled(code))
    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "minari"), PYTHONPATH=str(REPO))
    # A snippet that writes a Minari dataset must also work when run again, over what the first run wrote.
    for run in range(1, (2 if "to_minari" in code else 1) + 1):
        result = subprocess.run(
            [sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{heading} (run {run}):\n{result.stderr[-3000:]}"
    for name in re.findall(r"\.save\(\"([^\"]+)\"\)", code):
        assert (tmp_path / f"{name}.zip").exists(), name
    # It ends by printing what it achieved, in the form the README promises (numbers aside: budgets are scaled).
    printed = [RESULT_NUMBER.sub("#", line.strip()) for line in result.stdout.splitlines()]
    for promised in _promised_lines(heading):
        assert RESULT_NUMBER.sub("#", promised) in printed, f"{heading}: {promised!r} not in\n{result.stdout[-2000:]}"


README_MODULES = sorted(set(re.findall(r"python -m (sb3_elmur(?:\.\w+)+)", SHELL)))


def test_readme_names_existing_modules_and_scripts():
    assert README_MODULES == [
        "sb3_elmur.compare", "sb3_elmur.datasets", "sb3_elmur.envs.vulkan", "sb3_elmur.export", "sb3_elmur.tmaze_eval",
        "sb3_elmur.zoo"
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
        assert re.search(r"\b(torch|th)\.set_num_threads\(1\)", (REPO / script).read_text()), script


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
