"""The resumable unit of work of the long offline benchmarks (sb3_elmur.common.utils.train_and_evaluate_once), and the
lock that processes writing one results file take turns at (exclusive_lock with wait)."""

import json
import threading

import pytest

from sb3_elmur.common.utils import exclusive_lock, LockedError, train_and_evaluate_once


def _run(out, settings, trained):
    def train(path):
        path.write_text("model")
        trained.append(path)
        return {"train_cpu_seconds": 1.0}

    return train_and_evaluate_once("cfg_s0", out, train, lambda path: path.read_text(),
                                   lambda model, point: {"success": point / 10}, [1, 2], settings=settings)


def test_trains_once_evaluates_each_point_once_and_keeps_settings(tmp_path):
    trained = []
    record = _run(tmp_path, {"gradient_steps": 5}, trained)
    assert record["gradient_steps"] == 5 and record["evaluations"]["2"] == {"success": 0.2}
    _run(tmp_path, {"gradient_steps": 5}, trained)
    assert len(trained) == 1 and json.loads((tmp_path / "cfg_s0.json").read_text()) == record


def test_other_settings_or_a_lost_model_are_refused(tmp_path):
    trained = []
    _run(tmp_path, {"gradient_steps": 5}, trained)
    with pytest.raises(ValueError, match="gradient_steps=5, not 7"):
        _run(tmp_path, {"gradient_steps": 7}, trained)
    (tmp_path / "cfg_s0.zip").unlink()
    with pytest.raises(ValueError, match="holds its evaluations"):
        _run(tmp_path, {"gradient_steps": 5}, trained)
    assert len(trained) == 1


def test_a_waiting_lock_takes_its_turn_and_leaves_no_file(tmp_path):
    """wait=True blocks until the holder releases (flock is per open file, so a thread holds it like a process),
    then holds it itself; the file goes with the last holder."""
    lock = tmp_path / "results.lock"
    held, release, order = threading.Event(), threading.Event(), []

    def holder():
        with exclusive_lock(lock):
            held.set()
            release.wait(5)
            order.append("holder released")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    with pytest.raises(LockedError):
        with exclusive_lock(lock):
            pass
    threading.Timer(0.2, release.set).start()
    with exclusive_lock(lock, wait=True):
        order.append("waiter holds")
    thread.join(5)
    assert order == ["holder released", "waiter holds"] and not lock.exists()
