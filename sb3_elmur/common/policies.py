"""ELMUR policies for sb3-contrib's ``RecurrentPPO`` (and any algorithm that takes its recurrent policies).

sb3-contrib's algorithm and rollout buffer know one recurrent state: an LSTM-shaped pair (hidden, cell) of
float32 tensors ``[num_layers, n_envs, hidden_size]``. :class:`ElmurBackbone` packs ELMUR's state into that
pair and unpacks it exactly, and exposes ``num_layers`` / ``hidden_size`` where ``RecurrentPPO`` reads them
(``policy.lstm_actor``), so the stock algorithm runs unchanged.
"""

from typing import Any, Dict, List, Optional, Tuple, Type, Union

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
)
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from sb3_elmur.common.backbone import ElmurBackbone
from sb3_elmur.common.checks import NonFiniteError, RecurrentStateError, check_bool, check_finite_observation
from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.memory import ElmurState

# of the compiled graph (measured).
COMPILE_OPTIONS = dict(dynamic=False, fullgraph=True, options={"cpp_wrapper": True})


# Smallest image side NatureCNN takes: its 8/4, 4/2 and 3/1 convolutions leave at least one pixel from 36.
NATURE_CNN_MIN_SIZE = 36


def check_net_arch(net_arch: Any) -> None:
    """Check ``net_arch`` (the actor and critic heads on top of the ELMUR output) before SB3 builds them: a wrong
    type otherwise fails in torch (``empty(): argument 'size' ... found element of type str``).

    :param net_arch: None, a list of layer widths (both heads), or a dict with lists ``pi`` and ``vf``
    :raises ValueError: anything else
    """
    expected = "None, a list of positive layer widths such as [64, 64], or dict(pi=[64, 64], vf=[64, 64])"

    def widths_ok(widths: Any) -> bool:
        return isinstance(widths, (list, tuple)) and all(
            isinstance(width, (int, np.integer)) and not isinstance(width, bool) and width > 0 for width in widths
        )

    if net_arch is None or widths_ok(net_arch):
        return
    if isinstance(net_arch, dict) and set(net_arch) <= {"pi", "vf"} and all(map(widths_ok, net_arch.values())):
        return
    raise ValueError(f"ElmurPolicy net_arch must be {expected}, got {net_arch!r}")


def check_image_sizes(
    observation_space: spaces.Space,
    features_extractor_class: Type[BaseFeaturesExtractor],
    features_extractor_kwargs: Optional[Dict[str, Any]],
) -> None:
    """Check that every image NatureCNN would read is large enough, before it is built: a smaller one otherwise
    fails at its first forward pass, in torch ("Kernel size can't be greater than actual input size").

    :param observation_space: the policy's observation space
    :param features_extractor_class: the features extractor (only NatureCNN and CombinedExtractor are checked)
    :param features_extractor_kwargs: its keyword arguments
    :raises ValueError: an image smaller than ``NATURE_CNN_MIN_SIZE`` on a side, named
    """
    kwargs = features_extractor_kwargs or {}
    normalized = bool(kwargs.get("normalized_image", False))
    if issubclass(features_extractor_class, NatureCNN):
        images = {None: observation_space}
    elif issubclass(features_extractor_class, CombinedExtractor) and isinstance(observation_space, spaces.Dict):
        images = {key: space for key, space in observation_space.spaces.items()
                  if is_image_space(space, normalized_image=normalized)}
    else:
        return
    for key, space in images.items():
        if not isinstance(space, spaces.Box) or len(space.shape) != 3:
            continue  # NatureCNN names what it refuses itself
        # SB3's algorithms transpose channel-last images to channel-first before the policy sees them.
        height, width = space.shape[1:] if is_image_space_channels_first(space) else space.shape[:2]
        if min(height, width) < NATURE_CNN_MIN_SIZE:
            name = "observation" if key is None else f"observation[{key!r}]"
            raise ValueError(
                f"{name} is an image of {height}x{width} pixels (shape {space.shape}), smaller than NatureCNN, the "
                f"default features extractor of {features_extractor_class.__name__}, takes: at least "
                f"{NATURE_CNN_MIN_SIZE}x{NATURE_CNN_MIN_SIZE}. Resize the images (e.g. "
                "gymnasium.wrappers.ResizeObservation), or pass policy_kwargs=dict(features_extractor_class=...) "
                "with an extractor for small images"
            )



class ElmurPolicy(RecurrentActorCriticPolicy):
    """Actor-critic policy with an ELMUR memory transformer in place of the LSTM.

    Takes the keyword arguments of sb3-contrib's recurrent policies, except the LSTM ones, plus every field
    of :class:`~sb3_elmur.common.config.ElmurConfig` (``d_model``, ``n_layers``, ``n_heads``, ``memory_size``,
    ``context_length``, ``alpha``, ...).

    :param observation_space: Observation space
    :param action_space: Action space
    :param lr_schedule: Learning rate schedule
    :param net_arch: Actor and critic heads on top of the ELMUR output
    :param activation_fn: Activation function of the heads
    :param ortho_init: Orthogonal initialisation of the features extractor and heads
    :param log_std_init: Initial log std for Box actions
    :param features_extractor_class: Features extractor (turns observations into ELMUR inputs)
    :param features_extractor_kwargs: Its keyword arguments
    :param share_features_extractor: Share the features extractor between actor and critic
    :param normalize_images: Divide image observations by 255
    :param optimizer_class: Optimizer class
    :param optimizer_kwargs: Optimizer keyword arguments (excluding the learning rate); for Adam and AdamW, None
        means ``foreach=True``
    :param shared_backbone: One ELMUR backbone for actor and critic (default); False gives the critic its own
        backbone (twice the compute).
    :param detach_critic: With a shared backbone, the critic head reads detached features, so only the policy
        loss trains the backbone (sb3-contrib's ``shared_lstm``). Default False: the value loss trains it too,
        which on POPGym and T-Maze learned much faster (the policy gradient alone shapes memory slowly).
    :param freeze_backbone: Keep the ELMUR backbone(s) at their random initialisation and train only the features
        extractor and the heads (an extension beyond the paper, opt-in). Use it when a cue must be recalled far
        back: PPO's early updates wash a held cue out of a trained backbone's output, while a frozen one keeps it
        (``benchmarks/results/online_memory.md``; pair it with ``read_init_std=0.3`` so the untrained read is
        sharp). Training is cheaper too: no gradient goes through the backbone.
    :param elmur_kwargs: Fields of :class:`~sb3_elmur.common.config.ElmurConfig`
    :raises InsufficientMemoryError: the config's sizes ask for more memory than the machine has (named)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: Optional[Union[List[int], Dict[str, List[int]]]] = None,
        activation_fn: Type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        log_std_init: float = 0.0,
        full_std: bool = True,
        use_expln: bool = False,
        squash_output: bool = False,
        features_extractor_class: Type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: Optional[Dict[str, Any]] = None,
        share_features_extractor: bool = True,
        normalize_images: bool = True,
        optimizer_class: Type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: Optional[Dict[str, Any]] = None,
        shared_backbone: bool = True,
        detach_critic: bool = False,
        freeze_backbone: bool = False,
        **elmur_kwargs: Any,
    ) -> None:
        if use_sde:
            raise ValueError("ElmurPolicy does not support gSDE (use_sde=True): use the default Gaussian noise")
        shared_backbone = check_bool("shared_backbone", shared_backbone)
        detach_critic = check_bool("detach_critic", detach_critic)
        freeze_backbone = check_bool("freeze_backbone", freeze_backbone)
        share_features_extractor = check_bool("share_features_extractor", share_features_extractor)
        if shared_backbone and not share_features_extractor:
            raise ValueError("shared_backbone=True needs share_features_extractor=True")
        check_net_arch(net_arch)
        check_image_sizes(observation_space, features_extractor_class, features_extractor_kwargs)
        unknown = set(elmur_kwargs) - set(ElmurConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ElmurPolicy keyword argument(s) {sorted(unknown)}")
        self.elmur_config = ElmurConfig(**elmur_kwargs)
        # Before anything is allocated: the backbone(s) with gradients and Adam's two moments (4 copies of the
        # weights), and the few recurrent states that acting holds (fresh, packed, unpacked).
        self.elmur_config.check_memory(n_states=3, copies=4 if shared_backbone else 8, what="ElmurPolicy")
        if optimizer_kwargs is None and optimizer_class in (th.optim.Adam, th.optim.AdamW):
            # ELMUR has many small parameter tensors: on CPU, torch's default per-tensor loop made the Adam step
            # a sixth of PPO's training time; the multi-tensor form cuts that to a few percent (as on GPU).
            optimizer_kwargs = {"foreach": True}
        self.lstm_output_dim = self.elmur_config.output_dim  # width the heads are built for
        # RecurrentActorCriticPolicy.__init__ would build LSTMs: build the plain actor-critic, then our backbones.
        ActorCriticPolicy.__init__(
            self,
            observation_space,
            action_space,
            lr_schedule,
            net_arch,
            activation_fn,
            ortho_init,
            use_sde,
            log_std_init,
            full_std,
            use_expln,
            squash_output,
            features_extractor_class,
            features_extractor_kwargs,
            share_features_extractor,
            normalize_images,
            optimizer_class,
            optimizer_kwargs,
        )
        self.shared_backbone = shared_backbone
        self.detach_critic = detach_critic
        self.shared_lstm = shared_backbone
        self.enable_critic_lstm = not shared_backbone
        self.lstm_kwargs: Dict[str, Any] = {}
        self.critic = None
        self.lstm_actor = ElmurBackbone(self.features_dim, self.elmur_config)
        self.lstm_critic = None if shared_backbone else ElmurBackbone(self.features_dim, self.elmur_config)
        self.lstm_hidden_state_shape = (1, 1, self.lstm_actor.hidden_size)
        self.freeze_backbone = freeze_backbone
        for backbone in (self.lstm_actor, self.lstm_critic):
            if backbone is not None and freeze_backbone:
                backbone.requires_grad_(False)
        trainable = [parameter for parameter in self.parameters() if parameter.requires_grad]
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)

    @property
    def optimizer(self) -> th.optim.Optimizer:
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: th.optim.Optimizer) -> None:
        # Every optimizer this policy gets (built here, by SB3's _build, or set by a user) checks its gradients.
        self._optimizer = optimizer
        self._register_finite_check()

    def _register_finite_check(self) -> None:
        optimizer = self.__dict__.get("_optimizer")
        if optimizer is not None and self._check_finite_gradients not in optimizer._optimizer_step_pre_hooks.values():
            optimizer.register_step_pre_hook(self._check_finite_gradients)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # Optimizers drop their hooks when pickled or deep-copied.
        self._register_finite_check()

    def _check_finite_gradients(self, optimizer: th.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: refuse a step with a NaN or inf gradient, before it touches any parameter."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # One fused reduction and one sync per step (the 2-norm is 2.5x faster than the max on CPU); a norm that
        # overflows from finite gradients is sorted out by the exact check below, which runs only then.
        if not grads or bool(th.stack(th._foreach_norm(grads)).isfinite().all()):
            return
        if all(bool(grad.isfinite().all()) for grad in grads):
            return
        names = [name for name, p in self.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise NonFiniteError(
            f"non-finite (NaN or inf) gradient in {shown or 'a parameter outside this policy'}: the optimizer step "
            "was skipped, so the parameters are unchanged. Usual causes: NaN or inf rewards or observations (wrap "
            "the env in stable_baselines3.common.vec_env.VecCheckNan to find the step that produces them), or a "
            "learning rate too large."
        )

    def _get_constructor_parameters(self) -> Dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(shared_backbone=self.shared_backbone, detach_critic=self.detach_critic,
                    freeze_backbone=self.freeze_backbone, **vars(self.elmur_config))
        return data

    def predict(
        self,
        observation: Union[np.ndarray, Dict[str, np.ndarray]],
        state: Optional[Tuple[np.ndarray, ...]] = None,
        episode_start: Optional[np.ndarray] = None,
        deterministic: bool = False,
    ) -> Tuple[np.ndarray, Optional[Tuple[np.ndarray, ...]]]:
        """sb3-contrib's ``predict``, with the state checked first.

        :raises RecurrentStateError: ``state`` is not a (hidden, cell) pair of this policy's packed shape, or its
            batch differs from the observations' or ``episode_start``'s
        :raises NonFiniteError: an observation holds NaN or inf
        """
        if state is not None:
            self.lstm_actor.check_packed_shape(state)
        check_finite_observation(observation, "ElmurPolicy.predict")
        return super().predict(observation, state, episode_start, deterministic)

    def _predict(
        self,
        observation: Union[th.Tensor, Dict[str, th.Tensor]],
        lstm_states: Tuple[th.Tensor, th.Tensor],
        episode_starts: th.Tensor,
        deterministic: bool = False,
    ) -> Tuple[th.Tensor, Tuple[th.Tensor, ...]]:
        # Acting takes one step per env: the backbone alone would read 2N observations with a state for N envs
        # as N sequences of 2 steps.
        n_obs = len(next(iter(observation.values())) if isinstance(observation, dict) else observation)
        n_state, n_starts = lstm_states[0].shape[1], episode_starts.numel()
        if not n_obs == n_state == n_starts:
            raise RecurrentStateError(
                f"batch sizes do not match: {n_obs} observations, a recurrent state for {n_state} envs and "
                f"{n_starts} episode starts"
            )
        return super()._predict(observation, lstm_states, episode_starts, deterministic)

    def _latents(
        self, obs: th.Tensor, lstm_states: RNNStates, episode_starts: th.Tensor
    ) -> Tuple[th.Tensor, th.Tensor, RNNStates]:
        """Actor and critic latents (after the heads' MLPs) and the new states: the part of sb3-contrib's
        ``forward`` / ``evaluate_actions`` that differs here (the shared backbone's critic is not detached)."""
        features = self.extract_features(obs)
        pi_features, vf_features = (features, features) if self.share_features_extractor else features
        latent_pi, states_pi = self._process_sequence(pi_features, lstm_states.pi, episode_starts, self.lstm_actor)
        if self.lstm_critic is None:
            latent_pi, latent_vf = self._heads(latent_pi)
            return latent_pi, latent_vf, RNNStates(states_pi, (states_pi[0].detach(), states_pi[1].detach()))
        latent_vf, states_vf = self._process_sequence(vf_features, lstm_states.vf, episode_starts, self.lstm_critic)
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)
        latent_vf = self.mlp_extractor.forward_critic(latent_vf)
        return latent_pi, latent_vf, RNNStates(states_pi, states_vf)

    def forward(
        self, obs: th.Tensor, lstm_states: RNNStates, episode_starts: th.Tensor, deterministic: bool = False
    ) -> Tuple[th.Tensor, th.Tensor, th.Tensor, RNNStates]:
        # RecurrentPPO's rollouts act through here: name a NaN observation before it becomes NaN logits.
        check_finite_observation(obs, "ElmurPolicy.forward (acting)")
        latent_pi, latent_vf, states = self._latents(obs, lstm_states, episode_starts)
        distribution = self._get_action_dist_from_latent(latent_pi)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        return actions.reshape((-1, *self.action_space.shape)), self.value_net(latent_vf), log_prob, states

    def evaluate_actions(
        self,
        obs: th.Tensor,
        actions: th.Tensor,
        lstm_states: Union[RNNStates, ElmurState],
        episode_starts: th.Tensor,
    ) -> Tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Values, log-probabilities and entropies of ``actions`` along N sequences, flattened sequence-major.

        :param lstm_states: the packed states of RecurrentPPO's buffer, or the typed :class:`ElmurState` of
            ElmurPPO's (one row per sequence: the state before its first step; shared backbone only)
        """
        if isinstance(self.action_space, spaces.MultiBinary):
            # SB3's buffer hands MultiBinary actions back as int8, which torch's Bernoulli.log_prob rejects.
            actions = actions.float()
        if isinstance(lstm_states, ElmurState):
            starts = episode_starts.reshape(lstm_states.step.shape[0], -1) > 0.5
            out, _ = self.backbone_sequences(obs, lstm_states, starts)
            latent_pi, latent_vf = self._heads(out.reshape(-1, out.shape[-1]))
        else:
            latent_pi, latent_vf, _ = self._latents(obs, lstm_states, episode_starts)
        distribution = self._get_action_dist_from_latent(latent_pi)
        return self.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()

    def backbone_sequences(
        self, obs: Union[th.Tensor, Dict[str, th.Tensor]], state: ElmurState, episode_starts: th.Tensor
    ) -> Tuple[th.Tensor, ElmurState]:
        """The (shared) backbone over N sequences of T steps from typed states, segment-parallel.

        :param obs: observations [N * T, ...], sequence-major (a dict of them for Dict spaces)
        :param state: state before each sequence's first step ([N] rows)
        :param episode_starts: [N, T] bool
        :return: outputs [N, T, output_dim] and the state after each sequence's last step
        """
        n, t = episode_starts.shape
        features = self.extract_features(obs)
        return self.lstm_actor.model(features.reshape(n, t, -1), state, episode_starts)

    def _heads(self, latent: th.Tensor) -> Tuple[th.Tensor, th.Tensor]:
        """Shared-backbone ELMUR output -> the actor's and the critic's latents (after the heads' MLPs)."""
        latent_vf = latent.detach() if self.detach_critic else latent
        return self.mlp_extractor.forward_actor(latent), self.mlp_extractor.forward_critic(latent_vf)

    @staticmethod
    def _process_sequence(
        features: th.Tensor,
        lstm_states: Tuple[th.Tensor, th.Tensor],
        episode_starts: th.Tensor,
        lstm: nn.Module,
    ) -> Tuple[th.Tensor, Tuple[th.Tensor, th.Tensor]]:
        # Whole sequences go through ELMUR segment-parallel, episode starts included: no per-step loop.
        return lstm(features, lstm_states, episode_starts)



class CnnElmurPolicy(ElmurPolicy):
    """:class:`ElmurPolicy` for image observations (NatureCNN features extractor by default)."""

    def __init__(self, *args: Any, features_extractor_class: Type[BaseFeaturesExtractor] = NatureCNN, **kwargs: Any):
        super().__init__(*args, features_extractor_class=features_extractor_class, **kwargs)


class MultiInputElmurPolicy(ElmurPolicy):
    """:class:`ElmurPolicy` for Dict observations (CombinedExtractor features extractor by default)."""

    def __init__(
        self, *args: Any, features_extractor_class: Type[BaseFeaturesExtractor] = CombinedExtractor, **kwargs: Any
    ):
        super().__init__(*args, features_extractor_class=features_extractor_class, **kwargs)
