"""Acting with an ElmurPolicy, one step at a time, with the layer outputs of the current segment cached."""

import contextlib
from typing import Dict, Iterator, Optional, Tuple, Union

import torch as th
from torch.distributions import Distribution
from stable_baselines3.common.preprocessing import preprocess_obs

from sb3_elmur.common.checks import NonFiniteError, check_finite_observation, finite_flag
from sb3_elmur.common.host_sync import is_accelerated
from sb3_elmur.common.memory import ElmurState
from sb3_elmur.common.policies import COMPILE_OPTIONS, ElmurPolicy


@contextlib.contextmanager
def unvalidated_distributions() -> Iterator[None]:
    """torch.distributions without the checks of their arguments and samples, inside the block: about 17 operator
    calls per acting step (a tenth of ElmurPPO's), spent on logits the policy computed from finite observations
    with finite weights (both checked where they enter: observations by the actor, gradients by the policy)."""
    validate = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(validate)


class ElmurActor:
    """Acting with an ElmurPolicy: every env's ELMUR state, unpacked, and the layer outputs of its current segment,
    kept between steps (``ElmurModel.step``), so a step computes the new token only. ElmurPPO's rollouts and
    ``sb3_elmur.common.evaluation`` act through it; packing the state into RecurrentPPO's (hidden, cell) pair and back
    would cost as much as the heads per step.

    :param policy: the policy to act with
    :param n_envs: number of envs
    :param compile: run steps that start no episode through ``torch.compile`` (two graphs: mid-segment and
        segment-completing steps, see ``ElmurModel.step_core``; same results, about 2x faster on CPU). Each
        process compiles at its first such steps (tens of seconds; needs a C++ compiler on CPU); a failure raises
        a RuntimeError that says to act without ``compile``; on an accelerator every step goes through one graph
        (``ElmurModel.step_branches`` passes its masks there)
    """

    def __init__(self, policy: ElmurPolicy, n_envs: int, compile: bool = False) -> None:
        self.policy, self.n_envs = policy, n_envs
        self.model = policy.lstm_actor.model
        self.state = self.model.initial_state(n_envs, policy.device)
        self.outputs: Optional[th.Tensor] = None
        self.compiled = th.compile(self._step_core, **COMPILE_OPTIONS) if compile else None
        # Deferred observation checks (defer_observation_checks): whether every observation since was finite, on the
        # device; None: each step checks its observations at once.
        self.finite: Optional[th.Tensor] = None

    def set_state(self, state: ElmurState) -> None:
        """Continue from ``state`` (its layer outputs are recomputed at the next step)."""
        self.state, self.outputs = state, None

    def _step_core(
        self, obs: Union[th.Tensor, Dict[str, th.Tensor]], state: ElmurState, branches: tuple,
        outputs: Optional[th.Tensor],
    ) -> Tuple[th.Tensor, Optional[th.Tensor], ElmurState, Optional[th.Tensor]]:
        features = self.policy.pi_features_extractor(obs)  # obs preprocessed (advance)
        latent, state, outputs = self.model.step_core(features, state, *branches, outputs)
        if self.policy.lstm_critic is None:
            latent_pi, latent_vf = self.policy._heads(latent)
        else:  # a separate critic backbone: acting needs the actor only
            latent_pi, latent_vf = self.policy.mlp_extractor.forward_actor(latent), None
        return latent_pi, latent_vf, state, outputs

    def advance(
        self, obs: Union[th.Tensor, Dict[str, th.Tensor]], state: ElmurState, episode_starts: th.Tensor,
        outputs: Optional[th.Tensor] = None,
    ) -> Tuple[th.Tensor, Optional[th.Tensor], ElmurState, Optional[th.Tensor]]:
        """One step from ``state`` (the acting path of rollouts, evaluation and the history rebuild of ElmurPPO).

        :param obs: observations of the state's rows, as tensors
        :param state: the state before the step; :param outputs: its cached layer outputs (None: recomputed)
        :param episode_starts: [n] bool, True where the observation starts an episode
        :return: the actor's and the critic's latents (the critic's None for a policy with a separate critic
            backbone), the state after the step and its layer outputs
        :raises NonFiniteError: an observation holds NaN or inf (after :meth:`defer_observation_checks`: raised by
            :meth:`check_deferred_observations` instead)
        """
        if self.finite is None:
            check_finite_observation(obs, "ElmurActor.step (acting)")
        else:
            flag = finite_flag(obs)
            self.finite = self.finite if flag is None else self.finite & flag
        # Eager, before the graph: SB3's preprocessing tests image spaces' bounds with numpy, which torch.compile
        # cannot trace (fullgraph); what the graph gets is the features extractor's input.
        obs = preprocess_obs(obs, self.policy.observation_space, normalize_images=self.policy.normalize_images)
        branches = self.model.step_branches(state, episode_starts)
        # On the CPU, steps that start an episode act eagerly (rare: a graph fewer); on an accelerator all are masked.
        starts = branches[2] is not None and not is_accelerated(episode_starts.device)
        if self.compiled is None or starts or outputs is None or len(state.step) != self.n_envs:
            return self._step_core(obs, state, branches, outputs)
        try:
            return self.compiled(obs, state, branches, outputs)
        except Exception as error:
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            raise RuntimeError(
                f"torch.compile of the acting step failed ({message}); on CPU it needs a working C++ compiler: "
                "act without compile (compile_acting=False; tmaze_eval: without --compile)"
            ) from error

    def step(
        self, obs: Union[th.Tensor, Dict[str, th.Tensor]], episode_starts: th.Tensor, rows: Optional[th.Tensor] = None,
        commit: bool = True,
    ) -> Tuple[th.Tensor, Optional[th.Tensor]]:
        """One step of every env (or of ``rows``) from the actor's state: the actor's and the critic's latents
        (see :meth:`advance`).

        :param obs: observations of the envs (of ``rows``), as tensors
        :param episode_starts: [n] bool, True where the observation starts an episode
        :param rows: the envs these observations belong to (None: all); only with ``commit=False``
        :param commit: keep the new state (False: look ahead, e.g. the value of a terminal observation)
        :raises NonFiniteError: an observation holds NaN or inf
        """
        state, outputs = self.state, self.outputs
        if rows is not None:
            state = ElmurState(*(part[rows] for part in state))
            outputs = None if outputs is None else outputs[rows]
        latent_pi, latent_vf, state, outputs = self.advance(obs, state, episode_starts, outputs)
        if commit:
            self.state, self.outputs = state, outputs
        return latent_pi, latent_vf

    def sample(self, obs: Union[th.Tensor, Dict[str, th.Tensor]], episode_starts: th.Tensor) -> Tuple[th.Tensor, ...]:
        """One rollout step of every env: :meth:`step`, then the heads, without gradients or distribution checks.

        :param obs: observations of the envs, as tensors
        :param episode_starts: [n] bool, True where the observation starts an episode
        :return: sampled actions, their log-probs and the values (what ElmurPPO's rollouts store)
        """
        with th.no_grad(), unvalidated_distributions():
            latent_pi, latent_vf = self.step(obs, episode_starts)
            distribution = self.policy._get_action_dist_from_latent(latent_pi)
            actions = distribution.get_actions()
            return actions, distribution.log_prob(actions), self.policy.value_net(latent_vf)

    def defer_observation_checks(self) -> None:
        """Check observations without making the host wait at every step (on a GPU, ``host_sync``): from now on each
        step adds to a flag on the device, read once by :meth:`check_deferred_observations`."""
        self.finite = th.ones((), dtype=th.bool, device=self.policy.device)

    def check_deferred_observations(
        self, context: str, observations: Optional[Union[th.Tensor, Dict[str, th.Tensor]]] = None
    ) -> None:
        """Read the flag of :meth:`defer_observation_checks` (one host sync) and check at every step again.

        :param context: who acted on them, for the message (e.g. "ElmurPPO rollout")
        :param observations: the observations acted on, [T, N, ...] tensors (a dict of them, or one), searched step
            by step for the message when one held NaN or inf
        :raises NonFiniteError: an observation acted on since :meth:`defer_observation_checks` held NaN or inf
        """
        finite, self.finite = self.finite, None
        if finite is None or bool(finite):
            return
        if observations is not None:
            parts = observations if isinstance(observations, dict) else {None: observations}
            for t in range(len(next(iter(parts.values())))):  # the first step that holds one raises, naming its value
                at_t = {key: value[t] for key, value in parts.items()}
                check_finite_observation(at_t if isinstance(observations, dict) else at_t[None], f"{context}, step {t}")
        raise NonFiniteError(
            f"{context}: an observation acted on since the last check (a terminal observation, whose value bootstraps "
            "the last reward of a truncated episode, if not one of the steps) held NaN or inf; on an accelerator "
            "observations are checked once per rollout, not at every step. A policy cannot act on it: fix the env, or "
            "wrap it in stable_baselines3.common.vec_env.VecCheckNan(env, raise_exception=True) to find the step that "
            "produces it."
        )
