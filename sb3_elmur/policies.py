"""ELMUR policies for sb3-contrib's ``RecurrentPPO`` (and any algorithm that takes its recurrent policies).

sb3-contrib's algorithm and rollout buffer know one recurrent state: an LSTM-shaped pair (hidden, cell) of
float32 tensors ``[num_layers, n_envs, hidden_size]``. :class:`ElmurBackbone` packs ELMUR's state into that
pair and unpacks it exactly, and exposes ``num_layers`` / ``hidden_size`` where ``RecurrentPPO`` reads them
(``policy.lstm_actor``), so the stock algorithm runs unchanged.
"""

import warnings
import zlib
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.policies import ActorCriticPolicy, BaseModel
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
)
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from sb3_elmur.model import ElmurConfig, ElmurModel, ElmurState, check_bool, select_rows

# float32 holds every integer up to 2**24 exactly: slot positions and step counters stay exact up to there.
MAX_EXACT_STEP = 2**24
# torch.compile of the acting step: fixed shapes (one batch per run); the C++ wrapper cuts the per-call overhead
# of the compiled graph (measured).
COMPILE_OPTIONS = dict(dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
# Below this many parameters, torch's intra-op threads cost more than they save (see ElmurBackbone.forward).
SMALL_MODEL_PARAMETERS = 1_000_000


class RecurrentStateError(ValueError):
    """A recurrent state that this policy cannot have made: another model's, another size, another batch."""


class NonFiniteError(FloatingPointError):
    """NaN or inf values where the policy needs finite ones: a gradient that reached the optimizer (the update was
    skipped, the parameters are unchanged), or an observation (refused before the policy reads it)."""


def check_finite_observation(observation: Any, context: str) -> None:
    """Refuse an observation that holds NaN or inf, naming where: otherwise it only shows up deep in torch, as
    "Expected parameter logits ... to satisfy the constraint" from the action distribution.

    :param observation: a batch of observations (numpy arrays or tensors, or a dict of them); integer ones pass
    :param context: who read it, for the message (e.g. "ElmurPolicy.predict")
    :raises NonFiniteError: some entry is NaN or inf
    """
    parts = observation.items() if isinstance(observation, dict) else [(None, observation)]
    for key, value in parts:
        if isinstance(value, th.Tensor):
            # One reduction (and, on GPU, one sync) per call: an acting step costs much more (measured 0.4%).
            if not th.is_floating_point(value) or bool(th.isfinite(value).all()):
                continue
            value = value.detach().cpu().numpy()
        else:
            value = np.asarray(value)
            if not np.issubdtype(value.dtype, np.floating) or np.isfinite(value).all():
                continue
        bad = np.argwhere(~np.isfinite(value))
        index = tuple(int(i) for i in bad[0])
        name = "observation" if key is None else f"observation[{key!r}]"
        raise NonFiniteError(
            f"{context}: {name} holds {len(bad)} NaN or inf value(s), the first {float(value[index])!r} at index "
            f"{list(index)} (of shape {list(value.shape)}; for a batch the first index is the env). A policy cannot "
            "act on it: fix the env, or wrap it in stable_baselines3.common.vec_env.VecCheckNan(env, "
            "raise_exception=True) to find the step that produces it."
        )


def layout_tag(config: ElmurConfig) -> int:
    """Tag of a packed state layout: a nonzero integer below 2**23 (exact in float32), from the config's sizes.

    0 is left for fresh rows. Two layouts share a tag with probability about 1e-7.
    """
    key = f"elmur-state-v1:{config.n_layers},{config.memory_size},{config.d_model},{config.context_length}"
    return zlib.crc32(key.encode()) % (2**23 - 1) + 1


def fresh_recurrent_state(policy: RecurrentActorCriticPolicy, n: int, device: th.device) -> Tuple[th.Tensor, th.Tensor]:
    """The packed (hidden, cell) state of ``n`` fresh episodes for any RecurrentPPO policy: all zeros is a fresh
    episode for ELMUR and the LSTM alike, so no reset flags are needed."""
    shape = (policy.lstm_hidden_state_shape[0], n, policy.lstm_hidden_state_shape[2])
    return th.zeros(shape, device=device), th.zeros(shape, device=device)


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


class ElmurBackbone(nn.Module):
    """ELMUR model with its state packed as an LSTM-shaped (hidden, cell) pair.

    Packed layout of one row (``state_size`` floats, split in two halves, zero-padded):
    ``[layout tag, step, positions (L*M), memory (L*M*D), segment tokens ((K-1)*D)]``. The tag (see
    :func:`layout_tag`) tells a state of this layout from any other; a row whose tag is 0 is a fresh row and
    unpacks to the initial state, so all-zero states (what ``predict`` and ``RecurrentPPO`` start from) are
    valid.

    :param features_dim: size of the features fed to the model
    :param config: model hyper-parameters
    """

    num_layers = 1  # read by RecurrentPPO to shape its buffers

    def __init__(self, features_dim: int, config: ElmurConfig) -> None:
        super().__init__()
        self.model = ElmurModel(int(features_dim), config)
        c = config
        self._sizes = [
            1, 1, c.n_layers * c.memory_size, c.n_layers * c.memory_size * c.d_model, (c.context_length - 1) * c.d_model
        ]
        self.state_size = sum(self._sizes)
        self.hidden_size = (self.state_size + 1) // 2
        self._padding = 2 * self.hidden_size - self.state_size
        self.layout_tag = layout_tag(config)
        self._threads_checked = False

    @property
    def input_size(self) -> int:
        return self.model.input_dim

    def describe_layout(self) -> str:
        """The config fields that set the packed layout, for error messages."""
        c = self.model.config
        return (
            f"ElmurConfig(n_layers={c.n_layers}, memory_size={c.memory_size}, d_model={c.d_model}, "
            f"context_length={c.context_length})"
        )

    def check_packed_shape(self, packed: Any) -> None:
        """Check that ``packed`` is a (hidden, cell) pair of arrays of this layout's shape ``[1, N, hidden_size]``.

        :param packed: the state, as tensors or numpy arrays
        """
        if not isinstance(packed, (tuple, list)) or len(packed) != 2:
            raise RecurrentStateError(
                f"an ELMUR recurrent state is a (hidden, cell) pair of arrays [1, n_envs, {self.hidden_size}], "
                f"got {type(packed).__name__}{f' of length {len(packed)}' if isinstance(packed, (tuple, list)) else ''}"
            )
        shapes = [tuple(getattr(part, "shape", ())) for part in packed]
        if any(len(shape) != 3 or shape[0] != self.num_layers for shape in shapes) or shapes[0] != shapes[1]:
            raise RecurrentStateError(
                f"an ELMUR recurrent state is a (hidden, cell) pair of arrays [1, n_envs, {self.hidden_size}], "
                f"got shapes {shapes[0]} and {shapes[1]}"
            )
        if shapes[0][2] != self.hidden_size:
            raise RecurrentStateError(
                f"recurrent state of size {shapes[0][2]}, but this policy's packed state has size {self.hidden_size} "
                f"(it expects a state made by an ElmurPolicy with {self.describe_layout()})"
            )

    def pack(self, state: ElmurState) -> Tuple[th.Tensor, th.Tensor]:
        """ElmurState -> (hidden, cell), each [1, N, hidden_size] float32."""
        n = state.step.shape[0]
        # One cat does it all (it runs every rollout step): it promotes the integer fields to float32, and
        # the tag and padding come in as parts.
        parts = [state.memory.new_full((n, 1), self.layout_tag), state.step.view(n, 1), state.positions.reshape(n, -1),
                 state.memory.reshape(n, -1), state.segment.reshape(n, -1)]
        if self._padding:
            parts.append(state.memory.new_zeros(n, self._padding))
        hidden, cell = th.cat(parts, dim=1).unsqueeze(0).chunk(2, dim=-1)
        return hidden, cell

    def unpack(self, packed: Tuple[th.Tensor, th.Tensor]) -> ElmurState:
        """(hidden, cell) -> ElmurState; fresh (all-zero) rows give the initial state.

        :raises RecurrentStateError: the state is not of this layout (another size, or a row with another tag)
        """
        self.check_packed_shape(packed)
        flat = th.cat(packed, dim=-1)[0, :, : self.state_size]
        n = flat.shape[0]
        c = self.model.config
        tag, step, positions, memory, segment = flat.split(self._sizes, dim=1)
        # Steps and positions are integers stored exactly (below MAX_EXACT_STEP): no rounding needed.
        decoded = ElmurState(
            memory=memory.reshape(n, c.n_layers, c.memory_size, c.d_model),
            positions=positions.long().reshape(n, c.n_layers, c.memory_size),
            segment=segment.reshape(n, c.context_length - 1, c.d_model),
            step=step[:, 0].long(),
        )
        # The common case costs one comparison and one sync: every row is a state of this layout.
        ours = tag[:, 0] == self.layout_tag
        if bool(ours.all()):
            return decoded
        fresh = tag[:, 0] == 0
        foreign = ~(ours | fresh)
        if bool(foreign.any()):
            row = int(foreign.nonzero()[0, 0])
            raise RecurrentStateError(
                f"this state was not made by an ElmurPolicy with {self.describe_layout()}: row {row} has layout tag "
                f"{float(tag[row, 0])!r}, expected {self.layout_tag} (or 0 for a fresh row). Pass the state that this "
                "policy returned, or None to start new episodes."
            )
        init = self.model.initial_state(n, flat.device)
        return select_rows(fresh, init, decoded)

    def forward(
        self, features: th.Tensor, packed: Tuple[th.Tensor, th.Tensor], episode_starts: th.Tensor
    ) -> Tuple[th.Tensor, Tuple[th.Tensor, th.Tensor]]:
        """Same contract as ``RecurrentActorCriticPolicy._process_sequence``: flat [N * T, F] features of
        N sequences of T steps (N from the state's batch size) -> flat [N * T, d_model] latents."""
        if not self._threads_checked:
            self._threads_checked = True
            self._warn_if_many_threads(features.device)
        if features.dim() != 2 or features.shape[1] != self.input_size:
            raise ValueError(f"expected features of shape [rows, {self.input_size}], got {tuple(features.shape)}")
        state = self.unpack(packed)
        n_seq, n_rows = state.step.shape[0], features.shape[0]
        if n_seq == 0 or n_rows % n_seq != 0 or episode_starts.numel() != n_rows:
            raise RecurrentStateError(
                f"batch sizes do not match: {n_rows} feature rows, a recurrent state for {n_seq} sequences and "
                f"{episode_starts.numel()} episode starts (expected rows = sequences x steps, one episode start per row)"
            )
        x = features.reshape(n_seq, -1, self.input_size)
        starts = episode_starts.reshape(n_seq, -1) > 0.5
        out, state = self.model(x, state, starts)
        if int(state.step.max()) >= MAX_EXACT_STEP:
            raise RuntimeError(f"episode longer than {MAX_EXACT_STEP} steps: packed ELMUR positions lose precision")
        return out.reshape(-1, out.shape[-1]), self.pack(state)

    def _warn_if_many_threads(self, device: th.device) -> None:
        n_threads = th.get_num_threads()
        if device.type != "cpu" or n_threads <= 1:
            return
        n_parameters = sum(p.numel() for p in self.parameters())
        if n_parameters < SMALL_MODEL_PARAMETERS:
            warnings.warn(
                f"ElmurPolicy runs a small model ({n_parameters:,} parameters) on CPU with torch using {n_threads} "
                "threads. For models this small, splitting each operation over threads costs more than it saves, "
                "and on a busy machine training was measured 5-17x slower: call torch.set_num_threads(1) at the "
                "start of the script (and run several processes in parallel for more throughput).",
                UserWarning,
                stacklevel=2,
            )


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
    :param optimizer_kwargs: Optimizer keyword arguments (excluding the learning rate); for Adam and AdamW, None
        means ``foreach=True``
    :param shared_backbone: One ELMUR backbone for actor and critic (default); False gives the critic its own
        backbone (twice the compute).
    :param detach_critic: With a shared backbone, the critic head reads detached features, so only the policy
        loss trains the backbone (sb3-contrib's ``shared_lstm``). Default False: the value loss trains it too,
        which on POPGym and T-Maze learned much faster (the policy gradient alone shapes memory slowly).
    :param elmur_kwargs: Fields of :class:`~sb3_elmur.model.ElmurConfig`
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
        **elmur_kwargs: Any,
    ) -> None:
        if use_sde:
            raise ValueError("ElmurPolicy does not support gSDE (use_sde=True): use the default Gaussian noise")
        shared_backbone = check_bool("shared_backbone", shared_backbone)
        detach_critic = check_bool("detach_critic", detach_critic)
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
        data.update(shared_backbone=self.shared_backbone, detach_critic=self.detach_critic, **vars(self.elmur_config))
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
        :return: outputs [N, T, d_model] and the state after each sequence's last step
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


class ElmurActor:
    """Acting with an ElmurPolicy: every env's ELMUR state, unpacked, and the layer outputs of its current segment,
    kept between steps (``ElmurModel.step``), so a step computes the new token only. ElmurPPO's rollouts and
    ``sb3_elmur.evaluation`` act through it; packing the state into RecurrentPPO's (hidden, cell) pair and back
    would cost as much as the heads per step.

    :param policy: the policy to act with
    :param n_envs: number of envs
    :param compile: run steps that start no episode through ``torch.compile`` (two graphs: mid-segment and
        segment-completing steps, see ``ElmurModel.step_core``; same results, about 2x faster on CPU). Each
        process compiles at its first such steps (tens of seconds; needs a C++ compiler on CPU); a failure raises
        a RuntimeError that says to act without ``compile``
    """

    def __init__(self, policy: ElmurPolicy, n_envs: int, compile: bool = False) -> None:
        self.policy = policy
        self.model = policy.lstm_actor.model
        self.state = self.model.initial_state(n_envs, policy.device)
        self.outputs: Optional[th.Tensor] = None
        self.compiled = th.compile(self._step_core, **COMPILE_OPTIONS) if compile else None

    def set_state(self, state: ElmurState) -> None:
        """Continue from ``state`` (its layer outputs are recomputed at the next step)."""
        self.state, self.outputs = state, None

    def _step_core(
        self, obs: Union[th.Tensor, Dict[str, th.Tensor]], state: ElmurState, branches: tuple,
        outputs: Optional[th.Tensor],
    ) -> Tuple[th.Tensor, Optional[th.Tensor], ElmurState, Optional[th.Tensor]]:
        features = BaseModel.extract_features(self.policy, obs, self.policy.pi_features_extractor)
        latent, state, outputs = self.model.step_core(features, state, *branches, outputs)
        if self.policy.lstm_critic is None:
            latent_pi, latent_vf = self.policy._heads(latent)
        else:  # a separate critic backbone: acting needs the actor only
            latent_pi, latent_vf = self.policy.mlp_extractor.forward_actor(latent), None
        return latent_pi, latent_vf, state, outputs

    def step(
        self, obs: Union[th.Tensor, Dict[str, th.Tensor]], episode_starts: th.Tensor, rows: Optional[th.Tensor] = None,
        commit: bool = True,
    ) -> Tuple[th.Tensor, Optional[th.Tensor]]:
        """One step of every env (or of ``rows``): the actor's and the critic's latents (the critic's None for a
        policy with a separate critic backbone).

        :param obs: observations of the envs (of ``rows``), as tensors
        :param episode_starts: [n] bool, True where the observation starts an episode
        :param rows: the envs these observations belong to (None: all); only with ``commit=False``
        :param commit: keep the new state (False: look ahead, e.g. the value of a terminal observation)
        :raises NonFiniteError: an observation holds NaN or inf
        """
        check_finite_observation(obs, "ElmurActor.step (acting)")
        state, outputs = self.state, self.outputs
        if rows is not None:
            state = ElmurState(*(part[rows] for part in state))
            outputs = None if outputs is None else outputs[rows]
        branches = self.model.step_branches(state, episode_starts)
        if self.compiled is not None and branches[2] is None and outputs is not None and rows is None:
            try:
                latent_pi, latent_vf, state, outputs = self.compiled(obs, state, branches, outputs)
            except Exception as error:
                message = f"{type(error).__name__}: {error}".splitlines()[0]
                raise RuntimeError(
                    f"torch.compile of the acting step failed ({message}); on CPU it needs a working C++ compiler: "
                    "act without compile (compile_acting=False; tmaze_eval: without --compile)"
                ) from error
        else:
            latent_pi, latent_vf, state, outputs = self._step_core(obs, state, branches, outputs)
        if commit:
            self.state, self.outputs = state, outputs
        return latent_pi, latent_vf


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
