"""Host syncs in ElmurPPO's rollout step, counted on any machine: an env simulated in torch on the device (as ManiSkill's
GPU backend is) behind ``ManiSkillVecEnv``'s adapter, acted on by ElmurPPO with the accelerator's code paths
(``host_sync.emulate_accelerator`` on a CPU), and every call that would make the host wait for a GPU recorded
(``HostSyncCounter``). A step may make only the syncs that ``ElmurPPO.collect_rollouts`` names; on CUDA,
``torch.cuda.set_sync_debug_mode`` counts them for real (the ``cuda`` test)."""

import warnings
from typing import Any, List, Optional, Tuple

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback

from sb3_elmur import ElmurPPO
from sb3_elmur.common.checks import NonFiniteError
from sb3_elmur.common.host_sync import HostSyncCounter, emulate_accelerator, is_accelerated
from sb3_elmur.envs.maniskill import ManiSkillVecEnv, _Batch

th.set_num_threads(1)

SMALL = dict(d_model=16, n_layers=2, n_heads=2, memory_size=2, context_length=4, alpha=0.5, memory_init_std=0.5)
N_ENVS, N_STEPS = 4, 16
STATS_COPY = ("Tensor.cpu", "step_wait")  # every step: done flags and episode statistics for SB3's infos
RESET_ROWS = ("torch.as_tensor of host data", "step_wait")  # episodes ended: their indices, for the partial reset
BOOTSTRAP_ROWS = ("torch.as_tensor of host data", "collect_rollouts")  # episodes cut by the time limit


class TorchReachBatch(_Batch):
    """``num_envs`` envs simulated with torch on ``device``, as a GPU simulator runs them: a point moves by its
    action; an episode lasts a length drawn at its start, 2 to 9 steps, cut at ``time_limit`` steps (truncated; the
    others terminate, successfully when the point is near its target). Nothing here reads a value on the host.

    :param num_envs: number of envs
    :param device: where they are simulated
    :param dict_obs: observations as a Dict (position; target and time) instead of one vector
    :param nan_at: the step (counted from the first reset) whose observation of env 1 gets a NaN, or None
    """

    time_limit = 7
    render_mode = None

    def __init__(self, num_envs: int, device: str = "cpu", dict_obs: bool = False, nan_at: Optional[int] = None) -> None:
        self.num_envs, self.device, self.dict_obs, self.nan_at = num_envs, th.device(device), dict_obs, nan_at
        self.action_space = spaces.Box(-1, 1, (2,), np.float32)
        box = lambda n: spaces.Box(-np.inf, np.inf, (n,), np.float32)  # noqa: E731
        self.observation_space = spaces.Dict({"position": box(2), "target": box(3)}) if dict_obs else box(5)
        self.generator = th.Generator(device=self.device).manual_seed(0)
        self.position, self.target = (th.zeros(num_envs, 2, device=self.device) for _ in range(2))
        self.length, self.steps = (th.zeros(num_envs, dtype=th.long, device=self.device) for _ in range(2))
        self.t = 0

    def _obs(self) -> Any:
        target = th.cat([self.target, (self.steps.float() / self.time_limit).unsqueeze(1)], dim=1)
        if self.dict_obs:
            return {"position": self.position.clone(), "target": target}
        return th.cat([self.position, target], dim=1)

    def reset(self, seeds: Any, env_idx: Optional[th.Tensor]) -> Any:
        rows = th.arange(self.num_envs, device=self.device) if env_idx is None else env_idx
        self.position[rows] = 0.0
        self.target[rows] = th.rand(len(rows), 2, device=self.device, generator=self.generator) * 2 - 1
        self.length[rows] = th.randint(2, 10, (len(rows),), device=self.device, generator=self.generator)
        self.steps[rows] = 0
        obs = self._obs()
        return {key: value[rows] for key, value in obs.items()} if self.dict_obs else obs[rows]

    def step(self, actions: Any) -> Tuple[Any, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        self.position += 0.5 * th.as_tensor(actions, device=self.device).clamp(-1, 1)
        self.steps += 1
        self.t += 1
        distance = (self.position - self.target).norm(dim=1)
        ended = self.steps >= self.length.clamp(max=self.time_limit)
        truncated = ended & (self.length > self.time_limit)
        obs = self._obs()
        if self.t == self.nan_at:
            (obs["position"] if self.dict_obs else obs)[1, 0] = float("nan")
        return obs, -distance, ended & ~truncated, truncated, ended & ~truncated & (distance < 1.0)

    def render(self) -> List[np.ndarray]:
        raise NotImplementedError

    def call(self, name: str, indices: List[int], args: tuple, kwargs: dict) -> List[Any]:
        return [getattr(self, name)(*args, **kwargs)] * len(indices)

    def get_attr(self, name: str, indices: List[int]) -> List[Any]:
        return [getattr(self, name)] * len(indices)

    def set_attr(self, name: str, value: Any, indices: List[int]) -> None:
        setattr(self, name, value)

    def close(self) -> None:
        pass


def tensor_env(device: str = "cpu", dict_obs: bool = False, nan_at: Optional[int] = None) -> ManiSkillVecEnv:
    """The adapter of ManiSkill's GPU backend over :class:`TorchReachBatch`, speaking tensors on ``device``."""
    env = ManiSkillVecEnv.__new__(ManiSkillVecEnv)
    env._setup(TorchReachBatch(N_ENVS, device, dict_obs, nan_at), device_observations=True, seed=0)
    return env


def small_model(env: ManiSkillVecEnv, device: str = "cpu", **policy_kwargs: Any) -> ElmurPPO:
    policy = "MultiInputElmurPolicy" if isinstance(env.observation_space, spaces.Dict) else "ElmurPolicy"
    return ElmurPPO(policy, env, n_steps=N_STEPS, batch_size=32, n_epochs=1, sequence_length=8, memory_horizon=4,
                    policy_kwargs={**SMALL, **policy_kwargs}, seed=0, device=device)


class SyncsPerStep(BaseCallback):
    """The host syncs recorded by ``syncs`` (a list that grows) between consecutive steps of a rollout, one whole step
    each (the end of one: bootstrap and storage; the acting and env step of the next), with whether episodes ended at
    the step it closes and whether some were cut by the time limit at the step it opens."""

    def __init__(self, syncs: List[Any]) -> None:
        super().__init__()
        self.syncs = syncs
        self.windows: List[Tuple[List[Any], bool, bool]] = []
        self.last: Optional[Tuple[int, bool]] = None

    def _on_rollout_start(self) -> None:
        self.last = None

    def _on_step(self) -> bool:
        infos = self.locals["infos"]
        ended = any("terminal_observation" in info for info in infos)
        cut = any(info.get("TimeLimit.truncated", False) for info in infos)
        if self.last is not None:
            start, cut_before = self.last
            self.windows.append((self.syncs[start:], ended, cut_before))
        self.last = (len(self.syncs), cut)
        return True


def named_syncs(ended: bool, cut_before: bool) -> List[Tuple[str, str]]:
    """The host syncs ``ElmurPPO.collect_rollouts`` names for one step, in the order they happen."""
    return [BOOTSTRAP_ROWS] * cut_before + [STATS_COPY] + [RESET_ROWS] * ended


def _count(model: ElmurPPO, rollouts: int = 2) -> SyncsPerStep:
    with HostSyncCounter() as counter:
        steps = SyncsPerStep(counter.syncs)
        model.learn(rollouts * N_STEPS * N_ENVS, callback=steps)
    assert len(steps.windows) == rollouts * (N_STEPS - 1)
    return steps


@pytest.mark.parametrize("dict_obs", [False, True], ids=["box", "dict"])
def test_a_rollout_step_makes_only_the_named_host_syncs(dict_obs):
    with emulate_accelerator():
        steps = _count(small_model(tensor_env(dict_obs=dict_obs)))
    for syncs, ended, cut_before in steps.windows:
        assert [(sync.kind, sync.function) for sync in syncs] == named_syncs(ended, cut_before), syncs
    # the windows covered steps where episodes ended, by termination and by the time limit, and steps where none did
    assert {(ended, cut) for _, ended, cut in steps.windows} >= {(False, False), (True, False), (True, True)}


def test_the_cpu_paths_test_values_that_the_accelerator_paths_pass_as_masks():
    """The same rollout on the CPU's paths: each step tests whether any env starts an episode or completes a segment,
    whether one is at a segment boundary, and whether its observations are finite (cheap on a CPU: the counter
    sees them, as it would see such a test brought back into the accelerator's paths)."""
    assert not is_accelerated("cpu")
    steps = _count(small_model(tensor_env()), rollouts=1)
    for syncs, ended, cut_before in steps.windows:
        extra = [(sync.kind, sync.function) for sync in syncs if (sync.kind, sync.function) not in named_syncs(True, True)]
        assert extra.count(("Tensor.__bool__", "step_branches")) >= 2
        assert ("Tensor.__bool__", "record_anchor") in extra and ("Tensor.__bool__", "check_finite_observation") in extra


@pytest.mark.parametrize("cross_segment", ["off", "previous"])
def test_the_accelerator_paths_act_as_the_cpu_paths(cross_segment):
    """Masks instead of tests (``step_branches``, ``record_anchor``), the deferred observation check: two rollouts and
    an update give the same actions, values, stored states and parameters, bit for bit."""
    models = []
    for emulate in (False, True):
        # Segments of 3: episodes of up to 7 steps reach an anchor with either mode (every 6 steps with "previous")
        model = small_model(tensor_env(), cross_segment_attention=cross_segment, context_length=3)
        if emulate:
            with emulate_accelerator():
                model.learn(2 * N_STEPS * N_ENVS)
        else:
            model.learn(2 * N_STEPS * N_ENVS)
        models.append(model)
    cpu, accelerator = (model.rollout_buffer for model in models)
    for name in ("observations", "actions", "value_estimates", "log_probs", "advantages", "anchor_slots",
                 "anchor_memory", "anchor_positions", "anchor_steps", "anchor_previous"):
        assert th.equal(getattr(cpu, name), getattr(accelerator, name)), name
    assert cpu.anchor_slots.max() >= 0  # anchors were written
    for a, b in zip(models[0].policy.parameters(), models[1].policy.parameters()):
        assert th.equal(a, b)


def test_a_nan_observation_is_named_once_per_rollout_on_an_accelerator():
    with emulate_accelerator():
        model = small_model(tensor_env(nan_at=1))  # no episode ends at the first step (lengths from 2)
        message = r"ElmurPPO rollout, step 1: observation holds 1 NaN or inf value\(s\), the first nan at index \[1, 0\]"
        with pytest.raises(NonFiniteError, match=message):
            model.learn(N_STEPS * N_ENVS)


def test_the_counter_sees_what_makes_a_gpu_wait():
    t, mask, index = th.arange(4.0), th.tensor([True, False, True, False]), th.tensor([0, 1])
    with HostSyncCounter() as counter:
        bool(t.any()), t.sum().item(), t.tolist(), t.cpu(), float(t[0]), t.nonzero(), t[mask], t[[0, 1]]
        t[np.array([1])] = 0.0
        th.as_tensor(np.zeros(2)), th.tensor([1.0]), t.to("cpu"), th.where(mask)
        # none of these waits: values stay on the device
        t[index], t[1:], th.as_tensor(t), t.to(th.float64), th.where(mask, t, 0.0), t.masked_fill(mask, 1.0)
    kinds = [sync.kind for sync in counter.syncs]
    assert kinds == [
        "Tensor.__bool__", "Tensor.item", "Tensor.tolist", "Tensor.cpu", "Tensor.__float__",
        "nonzero (output sized by values)", "Tensor.__getitem__ with a bool mask",
        "Tensor.__getitem__ with a host index (list or array)", "Tensor.__setitem__ with a host index (list or array)",
        "torch.as_tensor of host data", "torch.tensor of host data", "Tensor.to the CPU", "where (output sized by values)",
    ]
    assert {sync.function for sync in counter.syncs} == {"test_the_counter_sees_what_makes_a_gpu_wait"}


@pytest.mark.cuda
@pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA device")
def test_a_rollout_step_on_cuda_makes_only_the_named_host_syncs():
    """On a GPU, with torch's own detector: every synchronising CUDA call of a step is a named one."""
    model = small_model(tensor_env(device="cuda"), device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = SyncsPerStep(caught)
        th.cuda.set_sync_debug_mode("warn")
        try:
            model.learn(2 * N_STEPS * N_ENVS, callback=steps)
        finally:
            th.cuda.set_sync_debug_mode("default")
    assert len(steps.windows) == 2 * (N_STEPS - 1)
    for caught_in_step, ended, cut_before in steps.windows:
        syncs = [str(warning.message) for warning in caught_in_step if "synchroniz" in str(warning.message)]
        assert len(syncs) == len(named_syncs(ended, cut_before)), syncs
