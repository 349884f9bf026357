"""One acting step of an ElmurPolicy as a pure torch function, free of data-dependent branches, for export.

:class:`ExportedStep` maps ``(observation, state..., episode_start[, noise])`` to ``(action, value, state...)``
through the very path that ``ElmurActor.advance`` (rollouts, evaluation) takes: the features extractor with SB3's
observation preprocessing, ``ElmurModel.step_core``, the heads, the action distribution, and Box clipping as in
``predict``. What differs is how the step picks its code path: on the CPU ``ElmurModel.step_branches`` tests on tensor
values whether any row starts an episode or completes a segment (a Python ``if``, which a traced graph would freeze at
the example's answer); here (``always_masks``, as on a GPU) ``reset`` and ``complete`` are always masks, which the
masked code paths of ``step_core`` handle for any mix of rows, all-False included (``torch.where``, ``masked_fill``
and ``lerp`` at weight 0 leave the other rows bit for bit).
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
)
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first, preprocess_obs
from torch import nn

from sb3_elmur.common.actor import ElmurActor, unvalidated_distributions
from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.memory import ElmurState
from sb3_elmur.common.policies import ElmurPolicy

# Uniform noise is clamped into [NOISE_LOW, NOISE_HIGH]: log(0) in the samplers would give inf or NaN.
NOISE_LOW, NOISE_HIGH = 1e-12, 1.0 - 2.0**-24


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of the exported step.

    :param name: its name in the ONNX graph (the TorchScript module takes them positionally, in this order)
    :param shape: its shape, with "batch" for the batch dimension
    :param dtype: numpy dtype name
    :param doc: what it holds
    """

    name: str
    shape: Tuple[Any, ...]
    dtype: str
    doc: str

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "doc": self.doc}


def state_specs(config: ElmurConfig, prefix: str = "") -> List[TensorSpec]:
    """The state of one ELMUR backbone as named tensors (see ``ElmurState``), plus the layer-output cache.

    :param config: the backbone's config
    :param prefix: "" for the actor's (shared) backbone, "critic_" for a separate critic's
    """
    n, m, d, k = config.memory_layers, config.memory_size, config.d_model, config.context_length
    whose = "" if not prefix else " (the critic's backbone)"
    return [
        TensorSpec(f"{prefix}memory", ("batch", n, m, d), "float32", f"memory slots of every layer{whose}"),
        TensorSpec(f"{prefix}positions", ("batch", n, m), "int64", "episode step of each slot's last write, -1: empty"),
        TensorSpec(f"{prefix}segment", ("batch", k - 1, d), "float32",
                   "input tokens of the current segment (the first step % K valid, zeros after)"),
        TensorSpec(f"{prefix}step", ("batch",), "int64", "steps taken in the current episode"),
        *([TensorSpec(f"{prefix}previous", ("batch", n, k, d), "float32", "every layer's inputs over the episode's last "
                      "completed segment (cross-segment attention; zeros before one)")] if config.previous_length else []),
        TensorSpec(f"{prefix}cache", ("batch", n, k, d), "float32",
                   "every layer's outputs at the current segment's positions (so a step computes its new token only)"),
    ]


def state_tensors(state: ElmurState, cache: th.Tensor, config: ElmurConfig) -> List[th.Tensor]:
    """The tensors of :func:`state_specs`, in order, from a typed state and its layer-output cache."""
    previous = [state.previous] if config.previous_length else []  # else empty, and not an input
    return [state.memory, state.positions, state.segment, state.step, *previous, cache]


def typed_state(parts: Sequence[th.Tensor], config: ElmurConfig) -> Tuple[ElmurState, th.Tensor]:
    """The typed state and the layer-output cache from the tensors of :func:`state_specs` (the inverse of
    :func:`state_tensors`)."""
    memory, positions, segment, step = parts[:4]
    if config.previous_length:
        previous = parts[4]
    else:
        previous = memory.new_zeros(memory.shape[0], config.memory_layers, 0, config.d_model)
    return ElmurState(memory, positions, segment, step, previous), parts[-1]


def observation_specs(space: spaces.Space, channels_last: Sequence[str] = ()) -> List[TensorSpec]:
    """The observation inputs: ``obs`` in the observation space's shape and dtype, or ``obs.<key>`` for each key of
    a Dict space (its key order).

    :param space: the policy's observation space
    :param channels_last: the inputs whose (channel-first) images are taken channel-last
    """
    items = list(space.spaces.items()) if isinstance(space, spaces.Dict) else [(None, space)]
    specs = []
    for key, sub in items:
        dtype = np.dtype(sub.dtype).name if sub.dtype is not None else "float32"
        name = "obs" if key is None else f"obs.{key}"
        shape = tuple(sub.shape)
        if name in channels_last:
            shape = (*shape[1:], shape[0])
        layout = ", channel-last" if name in channels_last else ""
        specs.append(TensorSpec(name, ("batch", *shape), dtype, f"observation{'' if key is None else f' {key!r}'} as "
                                f"the env gives it ({type(sub).__name__}{layout}); preprocessed inside the graph"))
    return specs


def channel_first_images(space: spaces.Space) -> List[str]:
    """The observation inputs that are channel-first images (which SB3 transposes from a channel-last env)."""
    items = list(space.spaces.items()) if isinstance(space, spaces.Dict) else [(None, space)]
    return [("obs" if key is None else f"obs.{key}") for key, sub in items
            if is_image_space(sub, check_channels=False) and is_image_space_channels_first(sub)]


def noise_size(action_space: spaces.Space) -> int:
    """Uniform numbers one stochastic step draws per row: one per category (Gumbel-max), per binary action, and
    two per Box dimension (Box-Muller)."""
    if isinstance(action_space, spaces.Discrete):
        return int(action_space.n)
    if isinstance(action_space, spaces.MultiDiscrete):
        return int(np.sum(action_space.nvec))
    if isinstance(action_space, spaces.MultiBinary):
        return int(np.prod(action_space.shape))
    if isinstance(action_space, spaces.Box):
        return 2 * int(np.prod(action_space.shape))
    raise ValueError(f"action space {action_space} is not exported (Discrete, MultiDiscrete, MultiBinary, Box)")


def action_spec(action_space: spaces.Space) -> TensorSpec:
    # Discrete kinds as int64 (the argmax's type), MultiBinary as float 0/1 and Box as float32, as predict returns them.
    dtype = "int64" if isinstance(action_space, (spaces.Discrete, spaces.MultiDiscrete)) else "float32"
    clip = ", clipped to the Box bounds" if isinstance(action_space, spaces.Box) else ""
    return TensorSpec("action", ("batch", *action_space.shape), dtype, f"the action{clip}")


def sample_from_noise(distribution: Distribution, noise: th.Tensor) -> th.Tensor:
    """A sample of ``distribution`` computed from uniform ``noise`` [N, noise_size] (see :func:`noise_size`), so that
    the caller owns the randomness: Gumbel-max for categorical actions, ``u < p`` for binary ones, Box-Muller for
    Gaussian ones.

    :param distribution: the policy's action distribution for N rows
    :param noise: uniform numbers in [0, 1)
    :return: actions [N, ...] before reshaping and clipping
    """
    u = noise.clamp(NOISE_LOW, NOISE_HIGH)
    if isinstance(distribution, CategoricalDistribution):
        return th.argmax(distribution.distribution.logits - th.log(-th.log(u)), dim=1)
    if isinstance(distribution, MultiCategoricalDistribution):
        parts = th.split(u, list(distribution.action_dims), dim=1)
        return th.stack([th.argmax(d.logits - th.log(-th.log(p)), dim=1)
                         for d, p in zip(distribution.distribution, parts)], dim=1)
    if isinstance(distribution, BernoulliDistribution):
        return (u < distribution.distribution.probs).to(th.float32)
    if isinstance(distribution, DiagGaussianDistribution):
        u1, u2 = u.chunk(2, dim=1)
        normal = th.sqrt(-2.0 * th.log(u1)) * th.cos(2.0 * math.pi * u2)
        return distribution.distribution.mean + distribution.distribution.stddev * normal
    raise ValueError(f"{type(distribution).__name__} is not exported")


class ExportedStep(nn.Module):
    """One acting step of ``policy``, with the state as explicit tensors; its inputs and outputs are
    :meth:`input_specs` and :meth:`output_specs`, positionally.

    :param policy: an ElmurPolicy (any of its subclasses), in evaluation mode on the CPU
    :param deterministic: the distribution's mode (as ``predict(deterministic=True)``); False: a sample drawn from an
        extra input ``noise`` of uniform numbers (:func:`sample_from_noise`)
    :param channels_last: take the channel-first images of the observation space channel-last (height, width,
        channels), as a channel-last env gives them, and transpose them in the graph (as SB3's VecTransposeImage)
    :raises ValueError: ``channels_last`` for an observation space without channel-first images
    """

    def __init__(self, policy: ElmurPolicy, deterministic: bool = True, channels_last: bool = False) -> None:
        super().__init__()
        if not isinstance(policy, ElmurPolicy):
            raise TypeError(f"ExportedStep takes an ElmurPolicy, got {type(policy).__name__}")
        if policy.squash_output:  # predict would unscale the actions from [-1, 1]: not in the graph
            raise ValueError("ExportedStep: a policy with squash_output=True is not exported")
        policy.set_training_mode(False)
        self.policy = policy
        self.deterministic = deterministic
        # ElmurActor._step_core is the acting path (features, backbone, heads); the actor's own state is unused.
        self._actor = ElmurActor(policy, 1)
        space = policy.observation_space
        self.obs_keys: Optional[List[str]] = list(space.spaces) if isinstance(space, spaces.Dict) else None
        self.obs_names = [spec.name for spec in observation_specs(space)]
        self.channels_last = channel_first_images(space) if channels_last else []
        if channels_last and not self.channels_last:
            raise ValueError(f"channels_last: the observation space {space} has no channel-first image to take "
                             "channel-last")
        self.backbones = [("", policy.lstm_actor.model)]
        if policy.lstm_critic is not None:
            self.backbones.append(("critic_", policy.lstm_critic.model))
        self.action_space = policy.action_space
        self.noise_size = noise_size(self.action_space)
        if isinstance(self.action_space, spaces.Box):
            self.register_buffer("action_low", th.as_tensor(self.action_space.low, dtype=th.float32))
            self.register_buffer("action_high", th.as_tensor(self.action_space.high, dtype=th.float32))

    def input_specs(self) -> List[TensorSpec]:
        specs = observation_specs(self.policy.observation_space, self.channels_last)
        for prefix, model in self.backbones:
            specs += state_specs(model.config, prefix)
        specs.append(TensorSpec("episode_start", ("batch",), "bool",
                                "True where the observation is the first of an episode (the state is reset first)"))
        if not self.deterministic:
            specs.append(TensorSpec("noise", ("batch", self.noise_size), "float32",
                                    "uniform numbers in [0, 1), the randomness of the sampled action"))
        return specs

    def output_specs(self) -> List[TensorSpec]:
        specs = [action_spec(self.action_space), TensorSpec("value", ("batch",), "float32", "the critic's value")]
        for prefix, model in self.backbones:
            specs += [TensorSpec(f"{spec.name}_out", spec.shape, spec.dtype, f"{spec.name} after the step")
                      for spec in state_specs(model.config, prefix)]
        return specs

    def example_inputs(self, batch_size: int) -> Tuple[th.Tensor, ...]:
        """Inputs for ``batch_size`` rows: zero observations, the initial state, every row starting an episode."""
        inputs = [th.zeros(batch_size, *spec.shape[1:], dtype=getattr(th, spec.dtype))
                  for spec in observation_specs(self.policy.observation_space, self.channels_last)]
        for _, model in self.backbones:
            cfg = model.config
            cache = th.zeros(batch_size, cfg.memory_layers, cfg.context_length, cfg.d_model)
            inputs += state_tensors(model.initial_state(batch_size), cache, cfg)
        inputs.append(th.ones(batch_size, dtype=th.bool))
        if not self.deterministic:
            inputs.append(th.full((batch_size, self.noise_size), 0.5))
        return tuple(inputs)

    def forward(self, *inputs: th.Tensor) -> Tuple[th.Tensor, ...]:
        n_obs = len(self.obs_names)
        # Channel-last images [N, H, W, C] to the policy's [N, C, H, W].
        observations = [x.permute(0, 3, 1, 2) if name in self.channels_last else x
                        for name, x in zip(self.obs_names, inputs[:n_obs])]
        obs: Any = observations[0] if self.obs_keys is None else dict(zip(self.obs_keys, observations))
        states, start = [], n_obs
        for _, model in self.backbones:
            size = len(state_specs(model.config))
            states.append(typed_state(inputs[start: start + size], model.config))
            start += size
        episode_start = inputs[start]
        policy = self.policy
        actor_model = self.backbones[0][1]
        state, cache = states[0]
        masks = actor_model.step_branches(state, episode_start, always_masks=True)
        with unvalidated_distributions():  # no argument checks (asserts on values) in the graph
            # SB3's observation preprocessing (one-hot, image scaling), then the acting path of ElmurActor.advance.
            obs = preprocess_obs(obs, policy.observation_space, normalize_images=policy.normalize_images)
            latent_pi, latent_vf, new_state, new_cache = self._actor._step_core(obs, state, masks, cache)
            outputs = state_tensors(new_state, new_cache, actor_model.config)
            if policy.lstm_critic is not None:  # a separate critic backbone, stepped on its own state
                state, cache = states[1]
                critic_model = self.backbones[1][1]
                features = policy.vf_features_extractor(obs)
                latent, critic_state, critic_cache = critic_model.step_core(
                    features, state, *critic_model.step_branches(state, episode_start, always_masks=True), cache)
                latent_vf = policy.mlp_extractor.forward_critic(latent)
                outputs += state_tensors(critic_state, critic_cache, critic_model.config)
            distribution = policy._get_action_dist_from_latent(latent_pi)
            if self.deterministic:
                action = distribution.mode()
            else:
                action = sample_from_noise(distribution, inputs[-1])
        action = action.reshape((-1, *self.action_space.shape))
        if isinstance(self.action_space, spaces.Box):  # as predict does (ElmurPolicy never squashes)
            action = th.minimum(th.maximum(action, self.action_low), self.action_high)
        elif isinstance(self.action_space, spaces.MultiBinary):
            action = action.to(th.float32)
        value = policy.value_net(latent_vf)[:, 0]
        # A view of the state's input (segment_out is a slice of the token buffer) would alias an input in ONNX.
        return (action, value, *(part.contiguous() for part in outputs))
