"""RecurrentBC: behaviour cloning of recurrent policies from offline episodes, as an SB3 algorithm.

Training samples windows of ``sections x context_length`` steps from the dataset, runs the policy over them
one section (segment) at a time with its recurrent state carried across sections, and back-propagates
through the whole window (or detaches the state between sections). It takes the policies of RecurrentPPO:
``ElmurPolicy`` and its variants, and sb3-contrib's ``MlpLstmPolicy`` for the BC-LSTM baseline.
"""

import time
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Tuple, Type, TypeVar, Union

import numpy as np
import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.ppo_recurrent.policies import CnnLstmPolicy, MlpLstmPolicy, MultiInputLstmPolicy
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CallbackList, ProgressBarCallback
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import obs_as_tensor
from torch import nn

from sb3_elmur.bc.advice import warn_if_long_burn_in, warn_if_no_evictions
from sb3_elmur.bc.datasets import EpisodeDataset, Windows, map_observations, n_rows
from sb3_elmur.bc.losses import action_loss
from sb3_elmur.bc.saving import split_old_final_action_head, to_cpu
from sb3_elmur.common.backbone import fresh_recurrent_state
from sb3_elmur.common.checks import check_bool, check_float, check_int, check_max_grad_norm
from sb3_elmur.common.evaluation import check_model_spaces
from sb3_elmur.common.memory import ElmurState
from sb3_elmur.common.policies import CnnElmurPolicy, ElmurPolicy, MultiInputElmurPolicy

SelfRecurrentBC = TypeVar("SelfRecurrentBC", bound="RecurrentBC")

class NonFiniteLossError(FloatingPointError):
    """The behaviour-cloning loss is NaN or inf: the step was skipped, the parameters are unchanged."""


class _GradientStepProgressBar(ProgressBarCallback):
    """SB3's progress bar counts env steps of the training env; here a timestep is one gradient step."""

    def _on_step(self) -> bool:
        self.pbar.update(1)
        return True


class RecurrentBC(BaseAlgorithm):
    """Behaviour cloning for recurrent policies, segment by segment with the state carried across segments.

    ``learn(total_timesteps)`` counts gradient steps.

    :param policy: policy name (``ElmurPolicy``, ``MlpLstmPolicy``, ...) or class
    :param env: environment matching the dataset (used for its spaces, and for evaluation callbacks)
    :param dataset: :class:`~sb3_elmur.datasets.EpisodeDataset`, a list of episodes, a Minari dataset id or a
        loaded ``MinariDataset`` (every step is checked against the env's spaces)
    :param learning_rate: learning rate (constant or schedule)
    :param batch_size: windows per gradient step
    :param sections: segments per window
    :param context_length: steps per segment (default: the ELMUR policy's ``context_length``; 10 for an LSTM)
    :param detach_between_sections: cut gradients between segments (the reference code's behaviour)
    :param burn_in: start a window that begins mid-episode from the memory of acting through the episode up to it
        (computed without gradient), as when acting; False starts every window from an empty memory, as the
        reference code does, which costs nothing but trains windows on a memory they never have when acting
    :param label_smoothing: label smoothing of the cross-entropy for discrete actions
    :param continuous_loss: "mse" (mean action against the target) or "nll" (Gaussian log-likelihood), Box actions
    :param final_action_coef: weight of an auxiliary loss (Discrete actions) that predicts, at every step, the action
        its episode ends with, through a linear head on the actor's latent that only training uses (0: off). On tasks
        whose decisive action comes at the end (T-Maze, noisy recall with a waiting expert) it asks memory to hold
        what decides it at every step, as an expert that names the cue at every step does. The head has an
        optimizer of its own and is saved in the zip's data, so that RecurrentPPO.load and ElmurPPO.load read the
        zip as any other RecurrentBC zip (and leave the head out)
    :param max_grad_norm: largest norm of the gradient (clipped to it), > 0
    :param policy_kwargs: keyword arguments of the policy
    :param tensorboard_log: tensorboard log folder
    :param verbose: 0 none, 1 training information
    :param seed: random seed
    :param device: torch device
    :param _init_setup_model: build the network at construction
    """

    policy_aliases: ClassVar[Dict[str, Type[BasePolicy]]] = {
        "ElmurPolicy": ElmurPolicy,
        "CnnElmurPolicy": CnnElmurPolicy,
        "MultiInputElmurPolicy": MultiInputElmurPolicy,
        "MlpLstmPolicy": MlpLstmPolicy,
        "CnnLstmPolicy": CnnLstmPolicy,
        "MultiInputLstmPolicy": MultiInputLstmPolicy,
    }
    policy: RecurrentActorCriticPolicy

    def __init__(
        self,
        policy: Union[str, Type[RecurrentActorCriticPolicy]],
        env: Union[GymEnv, str],
        dataset: Union[EpisodeDataset, List[Any], str, None] = None,
        learning_rate: Union[float, Schedule] = 3e-4,
        batch_size: int = 64,
        sections: int = 3,
        context_length: Optional[int] = None,
        detach_between_sections: bool = False,
        burn_in: bool = True,
        label_smoothing: float = 0.0,
        continuous_loss: str = "mse",
        final_action_coef: float = 0.0,
        max_grad_norm: float = 1.0,
        policy_kwargs: Optional[Dict[str, Any]] = None,
        tensorboard_log: Optional[str] = None,
        verbose: int = 0,
        seed: Optional[int] = None,
        device: Union[th.device, str] = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        # SB3's orthogonal init scales the action head by 0.01, which starves the recurrent backbone of gradient
        # in supervised training (measured: T-Maze BC stalls at chance with it, solves the task without it).
        policy_kwargs = {"ortho_init": False, **(policy_kwargs or {})}
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            policy_kwargs=policy_kwargs,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            support_multi_env=True,
            supported_action_spaces=(spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary, spaces.Box),
        )
        if continuous_loss not in ("mse", "nll"):
            raise ValueError(f"continuous_loss must be 'mse' or 'nll', got {continuous_loss!r}")
        self.batch_size = check_int("batch_size", batch_size)
        self.sections = check_int("sections", sections)
        self.context_length = None if context_length is None else check_int("context_length", context_length)
        self.detach_between_sections = check_bool("detach_between_sections", detach_between_sections)
        self.burn_in = check_bool("burn_in", burn_in)
        self.label_smoothing = check_float("label_smoothing", label_smoothing)
        # torch takes [0, 1]; 1 is uniform targets, which teaches nothing, so it is refused too.
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.continuous_loss = continuous_loss
        self.final_action_coef = check_float("final_action_coef", final_action_coef)
        if self.final_action_coef < 0.0:
            raise ValueError(f"final_action_coef must be >= 0, got {final_action_coef!r}")
        if self.final_action_coef > 0.0 and not isinstance(self.action_space, spaces.Discrete):
            raise ValueError(f"final_action_coef needs a Discrete action space, got {self.action_space}")
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.dataset: Optional[EpisodeDataset] = None
        if dataset is not None:
            self.set_dataset(dataset)
        if _init_setup_model:
            self._setup_model()

    def set_dataset(self, dataset: Union[EpisodeDataset, List[Any], str, Any]) -> None:
        """Use ``dataset`` (every step checked against the env's spaces) for the next calls to ``learn``.

        :param dataset: :class:`~sb3_elmur.datasets.EpisodeDataset`, a list of episodes, a Minari dataset id or
            a loaded ``MinariDataset``
        """
        if isinstance(dataset, str) or hasattr(dataset, "iterate_episodes"):
            dataset = EpisodeDataset.from_minari(dataset)
        elif isinstance(dataset, (np.ndarray, dict, bytes)) or not isinstance(dataset, (EpisodeDataset, Iterable)):
            raise TypeError(
                f"RecurrentBC's dataset is an EpisodeDataset, a list of episodes (Episode objects or dicts with "
                f"'observations' and 'actions'), a Minari dataset id or a MinariDataset; got a {type(dataset).__name__}"
            )
        elif not isinstance(dataset, EpisodeDataset):
            dataset = EpisodeDataset(dataset)
        dataset.check_spaces(self.observation_space, self.action_space)
        self.dataset = dataset

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs)
        if not isinstance(self.policy, RecurrentActorCriticPolicy):
            raise ValueError("RecurrentBC needs a recurrent policy (ElmurPolicy, MlpLstmPolicy, ...)")
        self.policy = self.policy.to(self.device)
        # Trained with the policy, never acts. Its optimizer is its own (of the policy's class and settings, so
        # training is as with one optimizer over both): the policy's optimizer state stays that of the policy alone,
        # which RecurrentPPO and ElmurPPO load from the zip.
        self.final_action_head: Optional[nn.Linear] = None
        self.final_action_optimizer: Optional[th.optim.Optimizer] = None
        if self.final_action_coef > 0.0:
            latent_dim = self.policy.mlp_extractor.latent_dim_pi
            self.final_action_head = nn.Linear(latent_dim, int(self.action_space.n)).to(self.device)
            self.final_action_optimizer = self.policy.optimizer_class(
                self.final_action_head.parameters(), lr=self.lr_schedule(1), **self.policy.optimizer_kwargs
            )
        # Set from the zip's data by load (see save), before this is called.
        saved_head = self.__dict__.pop("_final_action_state", None)
        if saved_head is not None:
            self._load_final_action_state(saved_head)
        if self.context_length is None:
            config = getattr(self.policy, "elmur_config", None)
            self.context_length = config.context_length if config is not None else 10
        self._rng = np.random.default_rng(self.seed)

    def _excluded_save_params(self) -> List[str]:
        return [*super()._excluded_save_params(), "dataset", "_rng", "_eviction_checked", "_long_burn_in_warned",
                "final_action_head", "final_action_optimizer"]

    def _get_torch_save_params(self) -> Tuple[List[str], List[str]]:
        # As RecurrentPPO: a resumed run continues Adam, and either algorithm loads the other's zip.
        return ["policy", "policy.optimizer"], []

    def save(self, path: Any, exclude: Optional[Iterable[str]] = None, include: Optional[Iterable[str]] = None) -> None:
        """SB3's ``save``. The final-action head and its optimizer state go into the zip's data (on the CPU), not
        into torch files of their own: RecurrentPPO.load and ElmurPPO.load take every torch file of a zip for one of
        their own attributes, and refused the zip of a model with a head; they now load it, without the head."""
        if self.final_action_head is not None and self.final_action_optimizer is not None:
            self._final_action_state = {
                "head": to_cpu(self.final_action_head.state_dict()),
                "optimizer": to_cpu(self.final_action_optimizer.state_dict()),
            }
        try:
            super().save(path, exclude=exclude, include=include)
        finally:
            self.__dict__.pop("_final_action_state", None)

    def _load_final_action_state(self, state: Dict[str, Any]) -> None:
        """Restore the final-action head and its optimizer (a state without ``optimizer``: a fresh one); nothing
        when this model has no head (``final_action_coef=0`` at load)."""
        if self.final_action_head is None or self.final_action_optimizer is None:
            return
        self.final_action_head.load_state_dict(state["head"])
        if state.get("optimizer") is not None:
            self.final_action_optimizer.load_state_dict(state["optimizer"])

    def set_parameters(
        self,
        load_path_or_dict: Union[str, Dict[str, Any]],
        exact_match: bool = True,
        device: Union[th.device, str] = "auto",
    ) -> None:
        """SB3's ``set_parameters``, which restores the final-action head too. Older zips load as well: one of
        sb3-elmur 0.1.0 (saved without its optimizer state) with a fresh optimizer and a warning, and one whose head
        was a torch file of its own (its Adam state the second parameter group of the policy's optimizer)."""
        if not isinstance(load_path_or_dict, dict):
            data, load_path_or_dict, _ = load_from_zip_file(load_path_or_dict, device=device)
            if data is not None and data.get("_final_action_state") is not None:
                self._load_final_action_state(data["_final_action_state"])
        if "final_action_head" in load_path_or_dict:
            load_path_or_dict, head_state = split_old_final_action_head(load_path_or_dict)
            self._load_final_action_state(head_state)
        old_zip = "policy.optimizer" not in load_path_or_dict
        if old_zip and "policy" in load_path_or_dict:
            warnings.warn(
                "this RecurrentBC model was saved without its optimizer state (sb3-elmur 0.1.0): the optimizer "
                "starts afresh; save the model again to keep it",
                UserWarning,
            )
            load_path_or_dict = {**load_path_or_dict, "policy.optimizer": self.policy.optimizer.state_dict()}
        super().set_parameters(load_path_or_dict, exact_match=exact_match, device=device)

    def _fresh_state(self, n: int) -> Tuple[th.Tensor, th.Tensor]:
        return fresh_recurrent_state(self.policy, n, self.device)

    def _sections(self, observations: Any, state: Tuple[th.Tensor, th.Tensor]) -> Iterator[Tuple[th.Tensor, Any]]:
        """The policy over a batch of sequences [B, S * K, ...], one section (segment) of K steps at a time with
        the recurrent state carried: for each section, its actor latent (flat B * K) and the state after it."""
        policy = self.policy
        features = self._features(observations)
        n, steps, k = features.shape[0], features.shape[1], self.context_length
        no_starts = th.zeros(n * k, device=self.device)
        for s in range(steps // k):
            section = features[:, s * k : (s + 1) * k].reshape(n * k, -1)
            latent, state = policy._process_sequence(section, state, no_starts, policy.lstm_actor)
            if self.detach_between_sections:
                state = (state[0].detach(), state[1].detach())
            yield latent, state

    def _whole_windows(self) -> bool:
        """ELMUR runs a window in one segment-parallel call (the same function as section by section, several
        times faster); the LSTM, and gradients cut between sections, go section by section."""
        return isinstance(self.policy, ElmurPolicy) and not self.detach_between_sections

    def _features(self, observations: Any) -> th.Tensor:
        """Actor features [B, T, F] of observations [B, T, ...]."""
        n, t = n_rows(observations), n_rows(map_observations(observations, lambda v: v[0]))
        flat = map_observations(observations, lambda v: v.reshape(n * t, *v.shape[2:]))
        policy = self.policy
        return policy.extract_features(obs_as_tensor(flat, self.device), policy.pi_features_extractor).view(n, t, -1)

    def _burn_in_state(self, prefixes: Any, prefix_segments: np.ndarray) -> Tuple[th.Tensor, th.Tensor]:
        """The state after each window's prefix (the episode before it), as acting reaches it; without gradient.

        In evaluation mode (no dropout) whatever mode training is in: acting runs without dropout, so a burn-in
        with it would start the windows from states that acting never reaches.
        """
        n = len(prefix_segments)
        initial = self._fresh_state(n)
        if not self.burn_in or prefix_segments.max() == 0:
            return initial
        was_training = self.policy.training
        self.policy.set_training_mode(False)
        try:
            return self._burn_in_state_eval(prefixes, prefix_segments, initial)
        finally:
            self.policy.set_training_mode(was_training)

    def _burn_in_state_eval(
        self, prefixes: Any, prefix_segments: np.ndarray, initial: Tuple[th.Tensor, th.Tensor]
    ) -> Tuple[th.Tensor, th.Tensor]:
        """:meth:`_burn_in_state` of windows that have prefixes, with the policy in evaluation mode."""
        n = len(prefix_segments)
        ends = th.as_tensor(prefix_segments, device=self.device)
        with th.no_grad():
            if self._whole_windows():
                packed = self.policy.lstm_actor.pack(self._elmur_burn_in(prefixes, ends))
                return tuple(th.where((ends > 0).view(1, n, 1), new, old) for new, old in zip(packed, initial))
            result = initial
            for s, (_, state) in enumerate(self._sections(prefixes, initial)):
                ends_here = (ends == s + 1).view(1, n, 1)  # rows whose prefix ends with this section
                result = tuple(th.where(ends_here, new, old) for new, old in zip(state, result))
        return result

    def _elmur_burn_in(self, prefixes: Any, prefix_segments: th.Tensor) -> ElmurState:
        """ELMUR's burn-in in one call: every prefix is moved to the end of its row and starts an episode there,
        so that the state after the call is the state after each prefix (rows without one: meaningless)."""
        model = self.policy.lstm_actor.model
        features = self._features(prefixes)
        n, total = features.shape[:2]
        shift = total - prefix_segments * self.context_length  # [B] padding steps moved before each prefix
        source = (th.arange(total, device=self.device) - shift.unsqueeze(1)) % total
        features = features.gather(1, source.unsqueeze(-1).expand_as(features))
        has_prefix = prefix_segments > 0
        starts = th.zeros(n, total, dtype=th.bool, device=self.device)
        starts[has_prefix, shift[has_prefix]] = True
        return model(features, model.initial_state(n, self.device), starts)[1]

    def _window_distributions(
        self, observations: Any, state: Optional[Tuple[th.Tensor, th.Tensor]] = None
    ) -> Iterator[Tuple[slice, th.Tensor, Distribution]]:
        """Action distributions over a batch of windows [B, sections * K, ...] from ``state`` (None: a fresh
        episode): each with the steps it covers and the actor latent it comes from (flat B * its steps), all at
        once for ELMUR (see :meth:`_whole_windows`), else one section at a time with the state carried across
        sections.

        A generator: SB3 policies reuse one distribution object, so each must be used before the next."""
        policy = self.policy
        state = self._fresh_state(n_rows(observations)) if state is None else state
        if self._whole_windows():
            out, _ = policy.lstm_actor.model(self._features(observations), policy.lstm_actor.unpack(state))
            latents = [(slice(None), out.reshape(-1, out.shape[-1]))]
        else:
            k = self.context_length
            latents = ((slice(s * k, (s + 1) * k), latent)
                       for s, (latent, _) in enumerate(self._sections(observations, state)))
        for cut, latent in latents:
            latent = policy.mlp_extractor.forward_actor(latent)
            try:
                distribution = policy._get_action_dist_from_latent(latent)
            except ValueError as error:
                if "invalid values" not in str(error):  # torch's argument validation: NaN / inf logits or means
                    raise
                raise self._non_finite("the action distribution's parameters are NaN or inf") from error
            yield cut, latent, distribution

    def _window_loss(self, windows: Windows) -> Tuple[th.Tensor, Dict[str, float]]:
        """Mean loss over the real steps of a batch of windows, and the metrics to log (greedy accuracy, and the
        final-action loss and accuracy with ``final_action_coef``)."""
        actions, mask = windows.actions, windows.mask
        start = time.perf_counter()
        state = self._burn_in_state(windows.prefixes, windows.prefix_segments)
        warn_if_long_burn_in(self, windows, time.perf_counter() - start)
        if self.final_action_head is not None:  # Discrete actions: one per window
            final_actions = th.as_tensor(windows.final_actions, device=self.device).long().view(-1, 1).expand(mask.shape)
        total_loss, final_loss = th.zeros((), device=self.device), th.zeros((), device=self.device)
        total_correct = final_correct = 0.0
        for cut, latent, distribution in self._window_distributions(windows.observations, state):
            part_actions = actions[:, cut]
            part_actions = th.as_tensor(part_actions.reshape(-1, *actions.shape[2:]), device=self.device)
            part_mask = th.as_tensor(mask[:, cut].reshape(-1), device=self.device)
            loss, correct = action_loss(distribution, part_actions, part_mask, self.action_space,
                                        self.label_smoothing, self.continuous_loss)
            total_loss = total_loss + loss.sum()
            total_correct += float(correct.sum())
            if self.final_action_head is not None:
                logits, target = self.final_action_head(latent), final_actions[:, cut].reshape(-1)
                final_loss = final_loss + (F.cross_entropy(logits, target, reduction="none") * part_mask).sum()
                final_correct += float(((logits.argmax(-1) == target).float() * part_mask).sum())
        n_real = float(mask.sum())
        metrics = {"accuracy": total_correct / n_real}
        if self.final_action_head is None:
            return total_loss / n_real, metrics
        metrics.update(final_action_loss=final_loss.item() / n_real, final_action_accuracy=final_correct / n_real)
        return (total_loss + self.final_action_coef * final_loss) / n_real, metrics

    def _non_finite(self, what: str) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"RecurrentBC: {what} at gradient step {self._n_updates}; the parameters were not updated. The dataset's "
            "values were checked by set_dataset, so the network diverged: lower the learning_rate or max_grad_norm, "
            "or go back to an earlier checkpoint"
        )

    def train(self) -> Dict[str, float]:
        """One gradient step on a batch of windows."""
        if self.dataset is None:
            raise ValueError("RecurrentBC needs a dataset: pass dataset= or call set_dataset()")
        self.policy.set_training_mode(True)
        optimizers = [self.policy.optimizer]
        if self.final_action_optimizer is not None:
            optimizers.append(self.final_action_optimizer)
        self._update_learning_rate(optimizers)
        window = self.sections * self.context_length
        windows = self.dataset.sample_windows(self._rng, self.batch_size, window, self.context_length)
        loss, metrics = self._window_loss(windows)
        if not th.isfinite(loss):
            # Before backward and step: the parameters and Adam's moments stay as they were.
            raise self._non_finite(f"the loss is {loss.item()}")
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        # One norm over the policy's parameters and the final-action head's, as one optimizer over both would clip.
        parameters = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        th.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm)
        for optimizer in optimizers:
            optimizer.step()
        self._n_updates += 1
        return {"loss": loss.item(), **metrics}

    def learn(
        self: SelfRecurrentBC,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 100,
        tb_log_name: str = "RecurrentBC",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfRecurrentBC:
        """Train for ``total_timesteps`` gradient steps.

        :param total_timesteps: number of gradient steps
        :param callback: SB3 callback(s), called after every gradient step
        :param log_interval: gradient steps between two logger dumps
        :param tb_log_name: tensorboard run name
        :param reset_num_timesteps: restart the step counter
        :param progress_bar: show a progress bar (tqdm / rich)
        """
        if self.dataset is None:
            raise ValueError("RecurrentBC needs a dataset: pass dataset= or call set_dataset() before learn()")
        warn_if_no_evictions(self)
        total_timesteps, callback = self._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name)
        if progress_bar:
            callback = CallbackList([callback, _GradientStepProgressBar()])
            callback.init_callback(self)
        callback.on_training_start(locals(), globals())
        while self.num_timesteps < total_timesteps:
            metrics = self.train()
            self.num_timesteps += 1
            self._update_current_progress_remaining(self.num_timesteps, total_timesteps)
            for key, value in metrics.items():
                self.logger.record_mean(f"train/{key}", value)
            callback.update_locals(locals())
            if not callback.on_step():
                break
            if log_interval and self.num_timesteps % log_interval == 0:
                self.logger.record("train/n_updates", self._n_updates)
                self.logger.record("train/learning_rate", self.lr_schedule(self._current_progress_remaining))
                self.logger.dump(step=self.num_timesteps)
        callback.on_training_end()
        return self

    def to_recurrent_ppo(self, env: Union[GymEnv, str], **ppo_kwargs: Any) -> RecurrentPPO:
        """A sb3-contrib ``RecurrentPPO`` on ``env`` whose policy starts from these weights (online fine-tuning).

        :param env: the env to fine-tune on (or its id), of this model's spaces
        :param ppo_kwargs: further keyword arguments of ``RecurrentPPO``
        :raise ValueError: if the env's spaces are not this model's (both named)
        """
        model = RecurrentPPO(type(self.policy), env, policy_kwargs=self.policy_kwargs, **ppo_kwargs)
        # The spaces as RecurrentPPO wrapped the env, as this model's were: weights of another env's spaces would
        # fail deep in load_state_dict, or load and act on observations they cannot read.
        name = env if isinstance(env, str) else getattr(getattr(env, "spec", None), "id", None) or type(env).__name__
        check_model_spaces(self, model.observation_space, model.action_space, f"the env {name}")
        model.policy.load_state_dict(self.policy.state_dict())
        return model
