"""ELMUR policies for sb3-contrib's ``RecurrentPPO`` (and any algorithm that takes its recurrent policies).

sb3-contrib's algorithm and rollout buffer know one recurrent state: an LSTM-shaped pair (hidden, cell) of
float32 tensors ``[num_layers, n_envs, hidden_size]``. :class:`ElmurBackbone` packs ELMUR's state into that
pair and unpacks it exactly, and exposes ``num_layers`` / ``hidden_size`` where ``RecurrentPPO`` reads them
(``policy.lstm_actor``), so the stock algorithm runs unchanged.
"""

from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
)
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from sb3_elmur.model import ElmurConfig, ElmurModel, ElmurState

# float32 holds every integer up to 2**24 exactly: slot positions and step counters stay exact up to there.
MAX_EXACT_STEP = 2**24


class ElmurBackbone(nn.Module):
    """ELMUR model with its state packed as an LSTM-shaped (hidden, cell) pair.

    Packed layout of one row (``state_size`` floats, split in two halves, zero-padded):
    ``[step + 1, positions (L*M), memory (L*M*D), segment tokens ((K-1)*D)]``. A row whose first entry is 0
    is a fresh row and unpacks to the initial state, so all-zero states (what ``predict`` starts from) are
    valid.

    :param features_dim: size of the features fed to the model
    :param config: model hyper-parameters
    """

    num_layers = 1  # read by RecurrentPPO to shape its buffers

    def __init__(self, features_dim: int, config: ElmurConfig) -> None:
        super().__init__()
        self.model = ElmurModel(int(features_dim), config)
        c = config
        self._sizes = [1, c.n_layers * c.memory_size, c.n_layers * c.memory_size * c.d_model, (c.context_length - 1) * c.d_model]
        self.state_size = sum(self._sizes)
        self.hidden_size = (self.state_size + 1) // 2
        self._padding = 2 * self.hidden_size - self.state_size

    @property
    def input_size(self) -> int:
        return self.model.input_dim

    def pack(self, state: ElmurState) -> Tuple[th.Tensor, th.Tensor]:
        """ElmurState -> (hidden, cell), each [1, N, hidden_size] float32."""
        n = state.step.shape[0]
        # One cat does it all (it runs every rollout step): it promotes the integer fields to float32, and
        # the padding comes in as a last part.
        parts = [(state.step + 1).view(n, 1), state.positions.reshape(n, -1), state.memory.reshape(n, -1),
                 state.segment.reshape(n, -1)]
        if self._padding:
            parts.append(state.memory.new_zeros(n, self._padding))
        hidden, cell = th.cat(parts, dim=1).unsqueeze(0).chunk(2, dim=-1)
        return hidden, cell

    def unpack(self, packed: Tuple[th.Tensor, th.Tensor]) -> ElmurState:
        """(hidden, cell) -> ElmurState; fresh (all-zero) rows give the initial state."""
        flat = th.cat(packed, dim=-1)[0, :, : self.state_size]
        n = flat.shape[0]
        c = self.model.config
        step1, positions, memory, segment = flat.split(self._sizes, dim=1)
        # Steps and positions are integers stored exactly (below MAX_EXACT_STEP): no rounding needed.
        decoded = ElmurState(
            memory=memory.reshape(n, c.n_layers, c.memory_size, c.d_model),
            positions=positions.long().reshape(n, c.n_layers, c.memory_size),
            segment=segment.reshape(n, c.context_length - 1, c.d_model),
            step=step1[:, 0].long() - 1,
        )
        fresh = decoded.step < 0
        if not bool(fresh.any()):
            return decoded
        init = self.model.initial_state(n, flat.device)
        return ElmurState(*(th.where(_expand(fresh, a), i, a) for i, a in zip(init, decoded)))

    def forward(
        self, features: th.Tensor, packed: Tuple[th.Tensor, th.Tensor], episode_starts: th.Tensor
    ) -> Tuple[th.Tensor, Tuple[th.Tensor, th.Tensor]]:
        """Same contract as ``RecurrentActorCriticPolicy._process_sequence``: flat [N * T, F] features of
        N sequences of T steps (N from the state's batch size) -> flat [N * T, d_model] latents."""
        n_seq = packed[0].shape[1]
        x = features.reshape(n_seq, -1, self.input_size)
        starts = episode_starts.reshape(n_seq, -1) > 0.5
        out, state = self.model(x, self.unpack(packed), starts)
        if int(state.step.max()) >= MAX_EXACT_STEP:
            raise RuntimeError(f"episode longer than {MAX_EXACT_STEP} steps: packed ELMUR positions lose precision")
        return out.reshape(-1, out.shape[-1]), self.pack(state)


def _expand(mask: th.Tensor, like: th.Tensor) -> th.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


class ElmurPolicy(RecurrentActorCriticPolicy):
    """Actor-critic policy with an ELMUR memory transformer in place of the LSTM.

    Takes the keyword arguments of sb3-contrib's recurrent policies, except the LSTM ones, plus every field
    of :class:`~sb3_elmur.model.ElmurConfig` (``d_model``, ``n_layers``, ``n_heads``, ``memory_size``,
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
    :param optimizer_kwargs: Optimizer keyword arguments (excluding the learning rate)
    :param shared_backbone: One ELMUR backbone for actor and critic (default); False gives the critic its own
        backbone (twice the compute).
    :param detach_critic: With a shared backbone, the critic head reads detached features, so only the policy
        loss trains the backbone (sb3-contrib's ``shared_lstm``). Default False: the value loss trains it too,
        which on POPGym and T-Maze learned much faster (the policy gradient alone shapes memory slowly).
    :param elmur_kwargs: Fields of :class:`~sb3_elmur.model.ElmurConfig`
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
        **elmur_kwargs: Any,
    ) -> None:
        if use_sde:
            raise ValueError("ElmurPolicy does not support gSDE (use_sde=True): use the default Gaussian noise")
        if shared_backbone and not share_features_extractor:
            raise ValueError("shared_backbone=True needs share_features_extractor=True")
        unknown = set(elmur_kwargs) - set(ElmurConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ElmurPolicy keyword argument(s) {sorted(unknown)}")
        self.elmur_config = ElmurConfig(**elmur_kwargs)
        self.lstm_output_dim = self.elmur_config.d_model  # width the heads are built for
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
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> Dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(shared_backbone=self.shared_backbone, detach_critic=self.detach_critic, **vars(self.elmur_config))
        return data

    def _latents(
        self, obs: th.Tensor, lstm_states: RNNStates, episode_starts: th.Tensor
    ) -> Tuple[th.Tensor, th.Tensor, RNNStates]:
        """Actor and critic latents (after the heads' MLPs) and the new states: the part of sb3-contrib's
        ``forward`` / ``evaluate_actions`` that differs here (the shared backbone's critic is not detached)."""
        features = self.extract_features(obs)
        pi_features, vf_features = (features, features) if self.share_features_extractor else features
        latent_pi, states_pi = self._process_sequence(pi_features, lstm_states.pi, episode_starts, self.lstm_actor)
        if self.lstm_critic is not None:
            latent_vf, states_vf = self._process_sequence(vf_features, lstm_states.vf, episode_starts, self.lstm_critic)
        else:
            latent_vf = latent_pi.detach() if self.detach_critic else latent_pi
            states_vf = (states_pi[0].detach(), states_pi[1].detach())
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)
        latent_vf = self.mlp_extractor.forward_critic(latent_vf)
        return latent_pi, latent_vf, RNNStates(states_pi, states_vf)

    def forward(
        self, obs: th.Tensor, lstm_states: RNNStates, episode_starts: th.Tensor, deterministic: bool = False
    ) -> Tuple[th.Tensor, th.Tensor, th.Tensor, RNNStates]:
        latent_pi, latent_vf, states = self._latents(obs, lstm_states, episode_starts)
        distribution = self._get_action_dist_from_latent(latent_pi)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        return actions.reshape((-1, *self.action_space.shape)), self.value_net(latent_vf), log_prob, states

    def evaluate_actions(
        self, obs: th.Tensor, actions: th.Tensor, lstm_states: RNNStates, episode_starts: th.Tensor
    ) -> Tuple[th.Tensor, th.Tensor, th.Tensor]:
        if isinstance(self.action_space, spaces.MultiBinary):
            # SB3's buffer hands MultiBinary actions back as int8, which torch's Bernoulli.log_prob rejects.
            actions = actions.float()
        latent_pi, latent_vf, _ = self._latents(obs, lstm_states, episode_starts)
        distribution = self._get_action_dist_from_latent(latent_pi)
        return self.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()

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
