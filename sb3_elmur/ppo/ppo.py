"""ElmurPPO: sb3-contrib's RecurrentPPO with ELMUR's own acting loop and rollout buffer."""

from typing import Any, ClassVar, Dict, List, Optional, Type, TypeVar, Union

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import get_action_dim, get_obs_shape
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import FloatSchedule
from stable_baselines3.common.vec_env import VecEnv

from sb3_elmur.common.actor import ElmurActor
from sb3_elmur.common.checks import check_bool, check_device, check_int, check_max_grad_norm, check_memory, format_bytes
from sb3_elmur.common.host_sync import is_accelerated
from sb3_elmur.common.memory import ElmurState
from sb3_elmur.common.policies import CnnElmurPolicy, ElmurPolicy, MultiInputElmurPolicy
from sb3_elmur.common.vec_env import host_dones, tensor_device
from sb3_elmur.ppo.buffers import ElmurRolloutBuffer, timeline_layout

SelfElmurPPO = TypeVar("SelfElmurPPO", bound="ElmurPPO")


def as_device_tensor(obs: Any, device: th.device) -> Any:
    """Observations (numpy arrays, or torch tensors from a GPU-simulated env; a dict of them) as tensors on
    ``device``: a tensor already there is used as it is, without a copy."""
    if isinstance(obs, dict):
        return {key: th.as_tensor(value, device=device) for key, value in obs.items()}
    return th.as_tensor(obs, device=device)


class ElmurPPO(RecurrentPPO):
    """PPO for ELMUR policies, with ELMUR's rollout buffer (:class:`~sb3_elmur.ppo.buffers.ElmurRolloutBuffer`).

    The losses and updates are RecurrentPPO's; what differs is how the recurrent state is kept. Rollouts act
    through :class:`~sb3_elmur.common.actor.ElmurActor` (the unpacked state and the current segment's layer outputs:
    each step computes one new token), the buffer stores the memory once per segment instead of a packed state
    per step, and training sequences of ``sequence_length`` steps start ``memory_horizon`` steps early, so memory
    writes up to that far back, in the previous rollout too, get gradients. A model saved by either algorithm
    loads into the other.

    :param sequence_length: rollout steps per training sequence (at most ``n_steps``; default None: ``n_steps``,
        one sequence per env and rollout, like the rows of RecurrentPPO's buffer). A rollout is cut into the fewest
        sequences of at most this many steps, of even lengths; a minibatch holds ``batch_size // sequence_length``
        of them (at least one), cut where episodes start (memory restarts there) and run segment-parallel side by
        side. Training costs about as many sequential segment passes per minibatch as its longest row (burn-in
        included) has segments
    :param memory_horizon: steps before each sequence recomputed with gradients but without loss, so that
        memory writes up to that far back (in the previous rollout too) learn from the sequence's losses (default
        None: ``n_steps``). A query's loss reaches the write of a cue ``D`` steps before it only when its row holds
        both: at delay 60 on noisy recall, for 2% of the queries with sequences of 32 and a horizon of 16 (the
        defaults before), 100% with the defaults (``benchmarks/results/credit_reach.md``; RecurrentPPO's
        buffer: 27-42%). Each sequence recomputes up to ``memory_horizon + context_length - 1`` steps before it
        (``memory_horizon + 2 * context_length - 1`` with cross-segment attention: the buffer then keeps every other
        boundary's state), which costs training time
    :param gae_lambda: GAE's lambda; 0.5 by default, not SB3's 0.95. Memory gets its credit through the gradient of
        the losses (``memory_horizon``), not through GAE; what a high lambda adds is the outcome of a late decision,
        spread over the tens of steps before it whose actions did not matter, as noise in their policy gradient. On
        noisy recall at delay 60 (one decisive action, at the end) a frozen, informative backbone taught its heads
        to 0.73 greedy success in 150k env steps at 0.95 and to 0.97 at 0.5 (seed 0, ``--freeze-backbone``); trained whole, ElmurPPO reaches the
        figures of ``benchmarks/results/memory_probe.md`` (label "ElmurPPO, read_init_std 0.1, gae_lambda 0.5")
    :param n_epochs: epochs over each rollout; 6 by default, not SB3's 10 (with ``normalize_advantage`` and
        ``ent_coef``, below)
    :param normalize_advantage: normalise advantages per minibatch; False by default, not SB3's True. With sparse
        rewards behind shaped steps (the passive T-Maze) the normalisation scales the shaping penalty above any entropy
        bonus and makes the neutral actions at the decision point reinforced ones: at corridor 100 the policy then never
        tries a turn. For rewards far above 1 per episode, pass True (or normalise rewards with ``VecNormalize``)
    :param ent_coef: entropy bonus; 0.001 by default, not SB3's 0. With raw advantages it keeps the untried actions
        alive. These three together (D 32, one layer): noisy recall at delay 60 1.00 +- 0.01 greedy success over seeds
        0-4 in 150k env steps (SB3's settings: 0.97 +- 0.02), the passive T-Maze at corridor 100 with 64-step rollouts
        and time-outs as terminations 1.00 on seeds 0-2 within 500k (SB3's: 0.00; 10 epochs solved it and lost it
        again, 4 epochs cost a recall seed), ``benchmarks/results/online_memory_diagnosis.md``
    :param compile_acting: act through ``torch.compile`` (see :class:`~sb3_elmur.common.actor.ElmurActor`: same
        actions, about 2x faster rollout steps on CPU after tens of seconds of compiling; needs a C++ compiler)
    (other parameters: see sb3-contrib's ``RecurrentPPO``; gSDE is not supported)
    """

    policy_aliases: ClassVar[Dict[str, Type[BasePolicy]]] = {
        "ElmurPolicy": ElmurPolicy,
        "CnnElmurPolicy": CnnElmurPolicy,
        "MultiInputElmurPolicy": MultiInputElmurPolicy,
    }
    rollout_buffer: ElmurRolloutBuffer
    policy: ElmurPolicy

    def __init__(
        self,
        policy: Union[str, Type[ElmurPolicy]],
        env: Union[GymEnv, str],
        learning_rate: Union[float, Schedule] = 3e-4,
        n_steps: int = 128,
        batch_size: Optional[int] = 128,
        n_epochs: int = 6,
        gamma: float = 0.99,
        gae_lambda: float = 0.5,
        clip_range: Union[float, Schedule] = 0.2,
        clip_range_vf: Union[None, float, Schedule] = None,
        normalize_advantage: bool = False,
        ent_coef: float = 0.001,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        target_kl: Optional[float] = None,
        sequence_length: Optional[int] = None,
        memory_horizon: Optional[int] = None,
        compile_acting: bool = False,
        stats_window_size: int = 100,
        tensorboard_log: Optional[str] = None,
        policy_kwargs: Optional[Dict[str, Any]] = None,
        verbose: int = 0,
        seed: Optional[int] = None,
        device: Union[th.device, str] = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        check_device(device)  # SB3 would fall back to the CPU silently
        self.sequence_length = sequence_length
        self.memory_horizon = memory_horizon
        self.compile_acting = compile_acting
        self._actor: Optional[ElmurActor] = None
        super().__init__(
            policy, env, learning_rate=learning_rate, n_steps=n_steps, batch_size=batch_size, n_epochs=n_epochs,
            gamma=gamma, gae_lambda=gae_lambda, clip_range=clip_range, clip_range_vf=clip_range_vf,
            normalize_advantage=normalize_advantage, ent_coef=ent_coef, vf_coef=vf_coef, max_grad_norm=max_grad_norm,
            target_kl=target_kl, stats_window_size=stats_window_size, tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs, verbose=verbose, seed=seed, device=device, _init_setup_model=False,
        )
        if _init_setup_model:
            self._setup_model()

    def _get_policy_from_name(self, policy_name: str) -> Type[BasePolicy]:
        """The ELMUR policy of this name; any other name is refused, naming the algorithm that takes it.

        :param policy_name: "ElmurPolicy", "CnnElmurPolicy" or "MultiInputElmurPolicy"
        :raises ValueError: another name (SB3 says only "Policy X unknown")
        """
        if policy_name in self.policy_aliases:
            return self.policy_aliases[policy_name]
        if policy_name in RecurrentPPO.policy_aliases:
            advice = f"{policy_name!r} is a policy of sb3-contrib's RecurrentPPO: use RecurrentPPO({policy_name!r}, env)"
        else:
            advice = "or an ElmurPolicy subclass"
        raise ValueError(
            f"ElmurPPO trains ELMUR policies, one of {sorted(self.policy_aliases)}, got policy={policy_name!r}: {advice}"
        )

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        if isinstance(self.policy_class, type) and not issubclass(self.policy_class, ElmurPolicy):
            raise ValueError(
                f"ElmurPPO trains ELMUR policies (ElmurPolicy, CnnElmurPolicy, MultiInputElmurPolicy), got "
                f"{self.policy_class.__name__}: use sb3-contrib's RecurrentPPO for it"
            )
        n_steps = check_int("n_steps", self.n_steps)
        # Defaults: one sequence per env and rollout, and a horizon of one more rollout, so a query's loss reaches
        # a write up to n_steps + its position in the rollout back (benchmarks/results/credit_reach.md).
        if self.sequence_length is None:
            self.sequence_length = n_steps
        if self.memory_horizon is None:
            self.memory_horizon = n_steps
        self.sequence_length = check_int("sequence_length", self.sequence_length)
        self.memory_horizon = check_int("memory_horizon", self.memory_horizon, minimum=0)
        # None: one minibatch of the whole rollout (the buffer's get); 0 would be taken as that too, silently.
        if self.batch_size is not None:
            self.batch_size = check_int("batch_size", self.batch_size)
        self.max_grad_norm = check_max_grad_norm(self.max_grad_norm)
        self.compile_acting = check_bool("compile_acting", self.compile_acting)
        self.policy = self.policy_class(self.observation_space, self.action_space, self.lr_schedule,
                                        **self.policy_kwargs).to(self.device)
        if not self.policy.shared_backbone:
            raise ValueError("ElmurPPO needs shared_backbone=True (one ELMUR for actor and critic); use "
                             "RecurrentPPO for separate backbones")
        self._check_memory(n_steps)
        self.rollout_buffer = ElmurRolloutBuffer(
            n_steps, self.observation_space, self.action_space, self.policy.elmur_config, self.device,
            gamma=self.gamma, gae_lambda=self.gae_lambda, n_envs=self.n_envs,
            sequence_length=min(self.sequence_length, n_steps), memory_horizon=self.memory_horizon,
        )
        self._actor = ElmurActor(self.policy, self.n_envs, compile=self.compile_acting)
        self.clip_range = FloatSchedule(self.clip_range)
        if self.clip_range_vf is not None:
            if isinstance(self.clip_range_vf, (float, int)) and self.clip_range_vf <= 0:
                raise ValueError("clip_range_vf must be positive, or None to disable value clipping")
            self.clip_range_vf = FloatSchedule(self.clip_range_vf)

    def _check_memory(self, n_steps: int) -> None:
        """Refuse a rollout buffer and training pass that cannot fit on the device, naming the arguments that size
        them (a huge ``memory_horizon`` would otherwise end in an out-of-memory kill or a bare allocator error).

        :param n_steps: rollout steps per env
        :raises InsufficientMemoryError: they do not fit
        """
        config = self.policy.elmur_config
        n_envs = self.n_envs
        history, timeline, anchor_slots = timeline_layout(config, n_steps, self.memory_horizon)
        obs_spaces = (self.observation_space.spaces.values() if isinstance(self.observation_space, spaces.Dict)
                      else [self.observation_space])
        obs_bytes = sum(int(np.prod(get_obs_shape(space))) * np.dtype(space.dtype).itemsize for space in obs_spaces)
        per_layer = config.memory_size * (config.d_model + 1) + config.previous_length * config.d_model
        anchor_bytes = config.memory_layers * per_layer * 4 + 4
        buffer = (timeline * n_envs * (obs_bytes + 5) + anchor_slots * n_envs * anchor_bytes
                  + n_steps * n_envs * (get_action_dim(self.action_space) + 5) * 4)
        # A training row recomputes up to memory_horizon + anchor_interval - 1 steps before its sequence (fewer
        # where an episode starts), with gradients: at least 24 floats per step, trained layer and d_model were saved
        # for the backward pass (measured 28-56 at the default config; a reservoir runs without gradients).
        rows = max(1, (self.batch_size or n_steps * n_envs) // self.sequence_length)
        activations = rows * (history + self.sequence_length) * config.n_layers * config.d_model * 24 * 4
        largest = "memory_horizon" if self.memory_horizon >= n_steps else "n_steps (or n_envs)"
        check_memory(
            buffer + activations,
            f"ElmurPPO with memory_horizon={self.memory_horizon}, n_steps={n_steps}, n_envs={n_envs} and "
            f"{config.describe()} (rollout buffer of {history} steps of history + n_steps = {timeline} "
            f"steps per env: {format_bytes(buffer)}; training activations of {rows} row(s) of up to "
            f"{history + self.sequence_length} steps: {format_bytes(activations)})",
            f"reduce {largest} (memory_horizon need not exceed the episode length)",
            self.device,
        )

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: ElmurRolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """Fill ``rollout_buffer`` with ``n_rollout_steps`` steps of every env (see SB3's ``collect_rollouts``).

        With an env of tensors on the device (``tensor_device``, e.g. ``ManiSkillVecEnv(..., sim_backend="gpu",
        device_observations=True)``), a step keeps observations, actions, rewards, dones, episode statistics and the
        recurrent state on the device. The host waits for it only where SB3's API makes it (``host_sync``;
        ``tests/test_host_syncs.py`` counts them): every step, the env reads its done flags and episode statistics back
        in one copy, because SB3's ``infos`` (a list of dicts) must name every env whose episode ended, with its
        statistics; on a step where episodes end, the env copies their indices to the device for the simulator's
        partial reset, and where some were cut by their time limit, ElmurPPO copies theirs to bootstrap their rewards
        from the values of their terminal observations (which those ``infos`` hold). Observations are checked for NaN
        or inf once per rollout instead of at every step. Once per rollout, rebuilding the actor's state reads a few
        sizes and the action bounds are copied to the device; once per ``learn`` call, SB3's first episode starts (a
        numpy array) are.
        """
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        callback.on_rollout_start()
        actor, device = self._actor, self.device
        with th.no_grad():
            rollout_buffer.restore_actor_state(actor)
        if is_accelerated(device):
            actor.defer_observation_checks()
        env_device, bounds = tensor_device(env), None
        if env_device is not None and isinstance(self.action_space, spaces.Box):
            bounds = [th.as_tensor(bound, device=device) for bound in (self.action_space.low, self.action_space.high)]
        n_steps = 0
        while n_steps < n_rollout_steps:
            obs = as_device_tensor(self._last_obs, device)
            starts = th.as_tensor(self._last_episode_starts, dtype=th.bool, device=device)
            rollout_buffer.record_anchor(actor.state, starts)
            actions, log_probs, values = actor.sample(obs, starts)
            if env_device is not None:  # the env takes tensors on its device: no copy through the host
                env_actions = actions.reshape((-1, *self.action_space.shape))
                if bounds is not None:
                    env_actions = th.clamp(env_actions, *bounds)
            else:
                env_actions = actions.cpu().numpy().reshape((-1, *self.action_space.shape))
                if isinstance(self.action_space, spaces.Box):
                    env_actions = np.clip(env_actions, self.action_space.low, self.action_space.high)
            new_obs, rewards, dones, infos = env.step(env_actions)
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            ended = host_dones(dones, infos)
            self._update_info_buffer(infos, ended)
            n_steps += 1
            rewards = th.as_tensor(rewards, dtype=th.float32, device=device)
            truncated = [i for i in np.flatnonzero(ended).tolist() if infos[i].get("terminal_observation") is not None
                         and infos[i].get("TimeLimit.truncated", False)]
            if truncated:  # bootstrap from the value of the last observation, all such envs in one call
                index = th.as_tensor(truncated, device=device)
                rewards[index] += self.gamma * self._terminal_values(infos, truncated, index)
            rollout_buffer.add(obs, actions, rewards, starts, values, log_probs)
            self._last_obs, self._last_episode_starts = new_obs, dones
        actor.check_deferred_observations("ElmurPPO rollout", rollout_buffer.rollout_observations())
        with th.no_grad():
            dones_tensor = th.as_tensor(dones, dtype=th.bool, device=device)
            _, latent_vf = actor.step(as_device_tensor(new_obs, device), dones_tensor, commit=False)
            last_values = self.policy.value_net(latent_vf)
        rollout_buffer.compute_returns_and_advantage(last_values, dones_tensor)
        callback.on_rollout_end()
        return True

    def _terminal_values(self, infos: List[Dict[str, Any]], rows: List[int], index: th.Tensor) -> th.Tensor:
        """Values of the terminal observations of ``rows`` (``index`` on the device), continuing their episodes'
        states."""
        terminal = [infos[i]["terminal_observation"] for i in rows]
        if isinstance(self.observation_space, spaces.Dict):
            stacked = {key: th.stack([as_device_tensor(obs[key], self.device) for obs in terminal])
                       for key in self.observation_space.spaces}
        else:
            stacked = th.stack([as_device_tensor(obs, self.device) for obs in terminal])
        with th.no_grad():
            obs = stacked
            starts = th.zeros(len(rows), dtype=th.bool, device=self.device)
            _, latent_vf = self._actor.step(obs, starts, rows=index, commit=False)
            return self.policy.value_net(latent_vf).flatten()

    def learn(
        self: SelfElmurPPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "ElmurPPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfElmurPPO:
        return super().learn(total_timesteps, callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar)

    @property
    def acting_state(self) -> Optional[ElmurState]:
        """The typed ELMUR state of every env after the last step of acting (None before the model is set up)."""
        return None if self._actor is None else self._actor.state

    def _excluded_save_params(self) -> List[str]:
        return super()._excluded_save_params() + ["_actor"]
