"""ElmurPPO's rollout buffer: transitions per step, ELMUR's memory once per segment, each env's recent past.

sb3-contrib's recurrent buffer stores an LSTM-shaped state at every step. ELMUR's state is mostly redundant
from step to step: its memory changes only when a segment of ``context_length`` steps completes, and its
partial segment is a function of the observations since the last completed one. So this buffer stores, per env,

- the observations and episode starts of the rollout and of the ``history_length`` steps before it (the
  *timeline*: ``memory_horizon + anchor_interval - 1`` steps of history, then ``n_steps`` of rollout);
- an *anchor*, the typed state (memory, slot positions, step, and with cross-segment attention every layer's
  inputs over the previous segment) at every ``anchor_interval``-th step of an episode, a segment boundary (an
  episode start needs none: the state restarts there);

and rebuilds the state anywhere by running the model from the anchor before it. Training sequences are
``sequence_length`` steps of one env; each starts from the last anchor at least ``memory_horizon`` steps before
its first step and runs the steps in between with gradients (no loss on them), so a memory write made up to
``memory_horizon`` steps earlier, in this rollout or the one before, learns from the losses that depend on it.
Memory restarts with every episode, so training cuts sequences where episodes start into independent rows (and
drops the pieces that hold no loss step).
"""

from typing import Dict, Generator, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import get_action_dim, get_obs_shape

from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.host_sync import is_accelerated
from sb3_elmur.common.memory import ElmurState, select_rows

TensorObs = Union[th.Tensor, Dict[str, th.Tensor]]


def anchor_interval(config: ElmurConfig) -> int:
    """Episode steps between the states the buffer keeps: every segment boundary, or with cross-segment
    attention every other one. There a state also holds every layer's inputs over the previous segment (five times
    the memory's bytes at the default config); keeping every other one halves what the buffer stores, for up to
    ``context_length`` more steps recomputed before a training sequence."""
    return config.context_length * (2 if config.previous_length else 1)


def timeline_layout(config: ElmurConfig, n_steps: int, memory_horizon: int) -> Tuple[int, int, int]:
    """The buffer's layout per env: steps of history, steps of the timeline (history then rollout), and anchor
    slots. Anchors are at least ``anchor_interval`` steps apart in an episode, and an episode start needs none: that
    many slots, used as a ring, hold every anchor of the timeline."""
    interval = anchor_interval(config)
    history = memory_horizon + interval - 1
    timeline = history + n_steps
    return history, timeline, timeline // interval + 2


class ElmurRolloutBufferSamples(NamedTuple):
    """A minibatch of N sequences of T steps, flattened sequence-major (what ``RecurrentPPO.train`` reads).

    ``states`` is the typed state before each sequence's first step; ``mask`` marks the steps that count
    in the losses (not the burn-in before them, nor the padding after them).
    """

    observations: TensorObs
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    states: ElmurState
    episode_starts: th.Tensor
    mask: th.Tensor

    @property
    def lstm_states(self) -> ElmurState:
        """``states``, under the name sb3-contrib's ``RecurrentPPO.train`` (which ElmurPPO runs) reads."""
        return self.states


class ElmurRolloutBuffer:
    """Rollout buffer for :class:`~sb3_elmur.ppo.ElmurPPO` (Box, Discrete, MultiDiscrete, MultiBinary
    actions; any observation space the policy takes, Dict included). Every tensor lives on ``device``.

    :param buffer_size: steps per env and rollout (``n_steps``)
    :param observation_space: observation space
    :param action_space: action space
    :param config: the policy's ELMUR config (state shapes, ``context_length``)
    :param device: where the tensors live
    :param gamma: discount factor
    :param gae_lambda: GAE lambda
    :param n_envs: number of envs
    :param sequence_length: steps of one training sequence (the losses' part; see the module docstring)
    :param memory_horizon: steps before each training sequence that are recomputed with gradients
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        config: ElmurConfig,
        device: Union[th.device, str] = "cpu",
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        n_envs: int = 1,
        sequence_length: int = 64,
        memory_horizon: int = 64,
    ) -> None:
        self.buffer_size, self.n_envs, self.device = buffer_size, n_envs, th.device(device)
        self.observation_space, self.action_space = observation_space, action_space
        self.gamma, self.gae_lambda = gamma, gae_lambda
        self.sequence_length, self.memory_horizon = sequence_length, memory_horizon
        self.context_length = config.context_length
        self.anchor_interval = anchor_interval(config)
        self.history_length, self.timeline_length, self.n_anchor_slots = timeline_layout(config, buffer_size, memory_horizon)
        self.action_dim = get_action_dim(action_space)
        shape = (self.timeline_length, n_envs)
        self.observations = self._observation_storage(observation_space, shape)
        self.episode_starts = th.zeros(shape, dtype=th.bool, device=self.device)
        self.anchor_slots = th.full(shape, -1, dtype=th.int32, device=self.device)
        slots = (self.n_anchor_slots, n_envs)
        self.anchor_memory = th.zeros(*slots, config.memory_layers, config.memory_size, config.d_model, device=self.device)
        self.anchor_positions = th.zeros(*slots, config.memory_layers, config.memory_size, dtype=th.int32,
                                         device=self.device)
        self.anchor_steps = th.zeros(slots, dtype=th.int32, device=self.device)
        # Empty (Kp = 0) without cross-segment attention.
        self.anchor_previous = th.zeros(*slots, config.memory_layers, config.previous_length, config.d_model,
                                        device=self.device)
        self.next_slot = th.zeros(n_envs, dtype=th.long, device=self.device)
        self.env_index = th.arange(n_envs, device=self.device)
        steps = (buffer_size, n_envs)
        self.actions = th.zeros(*steps, self.action_dim, device=self.device)
        self.rewards, self.value_estimates, self.log_probs, self.advantages, self.lambda_returns = (
            th.zeros(steps, device=self.device) for _ in range(5)
        )
        # Per env, the history step its actor state was restored from (``history_length``: none); None before
        # the restore of this rollout.
        self.history_anchor: Optional[th.Tensor] = None
        self.pos = 0  # rollout steps added
        self.history_filled = 0  # steps of history that hold real steps (fewer in the first rollouts)
        self.full = False

    def _observation_storage(self, space: spaces.Space, shape: tuple) -> TensorObs:
        if isinstance(space, spaces.Dict):
            return {key: self._observation_storage(sub, shape) for key, sub in space.spaces.items()}
        dtype = th.as_tensor(np.zeros(1, dtype=space.dtype)).dtype
        return th.zeros(*shape, *get_obs_shape(space), dtype=dtype, device=self.device)

    # -- rollout --------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new rollout: the last ``history_length`` steps of the timeline become its history."""
        h, end = self.history_length, self.history_length + self.pos
        if self.pos and h:
            keep = slice(end - h, end)
            for storage in self._observation_tensors():
                storage[:h] = storage[keep].clone()
            self.episode_starts[:h] = self.episode_starts[keep].clone()
            self.anchor_slots[:h] = self.anchor_slots[keep].clone()
        self.history_filled = min(h, self.history_filled + self.pos)
        self.anchor_slots[h:] = -1
        self.pos, self.full, self.history_anchor = 0, False, None

    def rollout_observations(self) -> TensorObs:
        """The observations of the rollout so far, [steps, n_envs, ...] (views, a dict of them for Dict spaces)."""
        h = self.history_length
        if isinstance(self.observations, dict):
            return {key: storage[h : h + self.pos] for key, storage in self.observations.items()}
        return self.observations[h : h + self.pos]

    def _observation_tensors(self):
        return self.observations.values() if isinstance(self.observations, dict) else [self.observations]

    def restore_actor_state(self, actor) -> None:
        """Rebuild the actor's state at the end of the history with the current parameters, from the anchor that
        training starts the history's sequences from (the last boundary ``memory_horizon`` steps before the
        rollout): acting and training then compute every step from the same state, an anchor written under
        older parameters included. Segment-parallel, then a few steps for the envs whose anchor is later.

        :param actor: a :class:`~sb3_elmur.common.actor.ElmurActor` of ``n_envs`` envs
        """
        h, n = self.history_length, self.n_envs
        self.history_anchor = None  # every boundary of the history is a candidate
        start = self._anchor_times(th.full((n,), h, device=self.device))
        self.history_anchor = th.full((n,), h, device=self.device)
        if self.history_filled == 0:
            actor.set_state(actor.model.initial_state(n, self.device))
            return
        # An env with no boundary in its history is at one now: the state it has is the anchor of its first
        # sequence (recorded at the rollout's first step).
        rows = (start < h).nonzero().flatten()
        if len(rows) == 0:
            return
        self.history_anchor[rows] = start[rows]
        start = start[rows]
        lengths = h - start
        policy = actor.policy

        def observations(times: th.Tensor) -> TensorObs:
            """The observations of ``rows`` at ``times`` ([R] or [R, T]), flattened row-major."""
            obs = self._index_observations(times, rows.view(-1, *[1] * (times.dim() - 1)).expand_as(times))
            if isinstance(obs, dict):
                return {key: value.flatten(0, times.dim() - 1) for key, value in obs.items()}
            return obs.flatten(0, times.dim() - 1)

        shortest = int(lengths.min())
        times = start.unsqueeze(1) + th.arange(shortest, device=self.device)
        _, state = policy.backbone_sequences(observations(times), self.anchor_states(start, rows),
                                             self.episode_starts[times, rows.unsqueeze(1)])
        for offset in range(shortest, int(lengths.max())):  # the rest, fewer than anchor_interval steps
            active = lengths > offset
            times = th.where(active, start + offset, h - 1)
            _, _, stepped, _ = actor.advance(observations(times), state, self.episode_starts[times, rows] & active)
            state = select_rows(active, stepped, state)
        actor.set_state(ElmurState(*(whole.index_copy(0, rows, part) for whole, part in zip(actor.state, state))))

    def record_anchor(self, state: ElmurState, episode_starts: th.Tensor) -> None:
        """Before the step at ``pos``: keep ``state`` (the one that step starts from) where its episode step is a
        multiple of ``anchor_interval`` and no episode starts. Every env is written, masked: the others keep what
        their slot holds."""
        rows = ~episode_starts & (state.step % self.anchor_interval == 0)
        # On the CPU, testing first skips the writes at most steps; on an accelerator the test would wait for the device.
        if not is_accelerated(self.device) and not bool(rows.any()):
            return
        envs, slots = self.env_index, self.next_slot % self.n_anchor_slots
        self.next_slot += rows
        self.anchor_slots[self.history_length + self.pos] = th.where(rows, slots, -1).int()
        for stored, value in ((self.anchor_memory, state.memory), (self.anchor_positions, state.positions),
                              (self.anchor_steps, state.step), (self.anchor_previous, state.previous)):
            keep = rows.view(-1, *[1] * (value.dim() - 1))
            stored[slots, envs] = th.where(keep, value.to(stored.dtype), stored[slots, envs])

    def add(
        self,
        obs: TensorObs,
        action: th.Tensor,
        reward: th.Tensor,
        episode_start: th.Tensor,
        value: th.Tensor,
        log_prob: th.Tensor,
    ) -> None:
        """Add one step of every env (tensors on ``device``; ``obs`` as the policy takes them)."""
        t = self.history_length + self.pos
        if isinstance(self.observations, dict):
            for key, storage in self.observations.items():
                storage[t] = obs[key].reshape(storage.shape[1:])
        else:
            self.observations[t] = obs.reshape(self.observations.shape[1:])
        self.episode_starts[t] = episode_start
        self.actions[self.pos] = action.reshape(self.n_envs, self.action_dim)
        self.rewards[self.pos] = reward
        self.value_estimates[self.pos] = value.flatten()
        self.log_probs[self.pos] = log_prob
        self.pos += 1
        self.full = self.pos == self.buffer_size

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: th.Tensor) -> None:
        """GAE(lambda) advantages and lambda-returns of the rollout.

        :param last_values: values of the observations that follow the rollout
        :param dones: whether those observations start new episodes
        """
        h, gae = self.history_length, th.zeros(self.n_envs, device=self.device)
        next_values, next_non_terminal = last_values.flatten(), 1.0 - dones.float()
        for step in reversed(range(self.buffer_size)):
            delta = self.rewards[step] + self.gamma * next_values * next_non_terminal - self.value_estimates[step]
            gae = delta + self.gamma * self.gae_lambda * next_non_terminal * gae
            self.advantages[step] = gae
            next_values, next_non_terminal = self.value_estimates[step], 1.0 - self.episode_starts[h + step].float()
        self.lambda_returns = self.advantages + self.value_estimates

    @property
    def values(self) -> np.ndarray:
        """The rollout's value estimates as a numpy array (what SB3's explained variance reads)."""
        return self.value_estimates.cpu().numpy()

    @property
    def returns(self) -> np.ndarray:
        """The rollout's lambda-returns as a numpy array."""
        return self.lambda_returns.cpu().numpy()

    # -- training -------------------------------------------------------------------------------------------

    def _boundaries(self) -> th.Tensor:
        """[timeline, n_envs] bool: the steps a sequence may start from: an anchor or an episode start in the
        rollout, and in the history, once the actor's state is restored, only the anchor it was restored from."""
        h = self.history_length
        boundary = (self.anchor_slots >= 0) | self.episode_starts
        boundary[: h - self.history_filled] = False
        boundary[h + self.pos :] = False
        if self.history_anchor is not None:
            boundary[:h] = False
            rows = (self.history_anchor < h).nonzero().flatten()
            boundary[self.history_anchor[rows], rows] = True
        return boundary

    def _anchor_times(self, first_steps: th.Tensor, envs: Optional[th.Tensor] = None) -> th.Tensor:
        """For sequences whose losses start at timeline step ``first_steps`` (of ``envs``): the last boundary at
        least ``memory_horizon`` steps before, or the first boundary there is if none is that far back."""
        envs = th.arange(self.n_envs, device=self.device) if envs is None else envs
        boundary = self._boundaries()
        time = th.arange(self.timeline_length, device=self.device).unsqueeze(1)
        last = th.where(boundary, time, -1).cummax(dim=0).values  # last boundary at or before each step
        first = th.where(boundary, time, self.timeline_length).min(dim=0).values
        latest = first_steps - self.memory_horizon
        found = last[latest.clamp(min=0), envs]
        return th.where((latest >= 0) & (found >= 0), found, first[envs])

    def anchor_states(self, times: th.Tensor, envs: th.Tensor) -> ElmurState:
        """The states before timeline steps ``times`` of ``envs``, which must be boundaries (an episode start
        gives zeros, which the start flag resets); the partial segment is empty at a boundary."""
        slots = self.anchor_slots[times, envs].long()
        stored = (slots >= 0).view(-1, 1, 1)
        slots = slots.clamp(min=0)
        n, memory = len(envs), self.anchor_memory[slots, envs]
        return ElmurState(
            memory=th.where(stored.unsqueeze(-1), memory, 0.0),
            positions=th.where(stored, self.anchor_positions[slots, envs].long(), -1),
            segment=memory.new_zeros(n, self.context_length - 1, memory.shape[-1]),
            step=th.where(stored.view(-1), self.anchor_steps[slots, envs].long(), 0),
            previous=th.where(stored.unsqueeze(-1), self.anchor_previous[slots, envs], 0.0),
        )

    def _index_observations(self, times, envs) -> TensorObs:
        if isinstance(self.observations, dict):
            return {key: storage[times, envs] for key, storage in self.observations.items()}
        return self.observations[times, envs]

    def sequences(self) -> Dict[str, th.Tensor]:
        """The training sequences of the rollout: env, anchor step, first and end step of the losses (timeline
        steps), one entry per env and chunk of the rollout (``ceil(n_steps / sequence_length)`` chunks per env,
        as even as can be)."""
        h = self.history_length
        # The fewest sequences of at most ``sequence_length`` steps, of lengths that differ by one at most: a
        # remainder never makes a sequence (and a minibatch) of a step or two, whose advantage std is undefined.
        n_chunks = -(-self.pos // self.sequence_length)
        bounds = h + th.arange(n_chunks + 1, device=self.device) * self.pos // n_chunks
        envs = th.arange(self.n_envs, device=self.device).repeat(n_chunks)
        first = bounds[:-1].repeat_interleave(self.n_envs)
        return {
            "env": envs,
            "anchor": self._anchor_times(first, envs),
            "first": first,
            "end": bounds[1:].repeat_interleave(self.n_envs),
        }

    def get(self, batch_size: Optional[int] = None) -> Generator[ElmurRolloutBufferSamples, None, None]:
        """Minibatches of whole sequences, in random order: ``batch_size // sequence_length`` sequences each
        (at least one; None: all in one), each cut into rows at episode starts."""
        assert self.full, "get() needs a complete rollout"
        table = self.sequences()
        n_sequences = len(table["env"])
        per_batch = n_sequences if batch_size is None else max(1, batch_size // self.sequence_length)
        order = th.randperm(n_sequences, device=self.device)
        for begin in range(0, n_sequences, per_batch):
            yield self.samples({key: value[order[begin : begin + per_batch]] for key, value in table.items()})

    @staticmethod
    def _flat(x: th.Tensor) -> th.Tensor:
        return x.flatten(0, 1)

    def _split_at_episode_starts(self, table: Dict[str, th.Tensor]) -> Dict[str, th.Tensor]:
        """The sequences of ``table`` cut where episodes start: memory restarts there, so each piece is an
        independent row. Rows get shorter (a pass costs one sequential step per segment of its longest row) and the
        pieces that end before their sequence's first loss step, burn-in only, are dropped."""
        envs, anchor, first, end = table["env"], table["anchor"], table["first"], table["end"]
        times = anchor.unsqueeze(1) + th.arange(int((end - anchor).max()), device=self.device)
        inside = times < end.unsqueeze(1)
        starts = self.episode_starts[times.clamp(max=self.timeline_length - 1), envs.unsqueeze(1)] & inside
        starts[:, 0] = True
        row, offset = starts.nonzero(as_tuple=True)  # row-major: a row's pieces in order
        piece_start = anchor[row] + offset
        next_in_row = th.cat([row[1:] == row[:-1], row.new_zeros(1, dtype=th.bool)])
        piece_end = th.where(next_in_row, th.cat([piece_start[1:], piece_start[-1:]]), end[row])
        keep = piece_end > first[row]
        row = row[keep]
        return {
            "env": envs[row],
            "anchor": piece_start[keep],
            "first": th.maximum(first[row], piece_start[keep]),
            "end": piece_end[keep],
        }

    def samples(self, table: Optional[Dict[str, th.Tensor]] = None) -> ElmurRolloutBufferSamples:
        """The training data of the sequences of ``table`` (from :meth:`sequences`; None: all of the rollout's) in one
        batch, each cut into rows at episode starts."""
        table = self._split_at_episode_starts(self.sequences() if table is None else table)
        envs, anchor, first, end = table["env"], table["anchor"], table["first"], table["end"]
        length = int((end - anchor).max())
        times = anchor.unsqueeze(1) + th.arange(length, device=self.device)
        inside = times < end.unsqueeze(1)
        mask = (times >= first.unsqueeze(1)) & inside
        # Padding repeats the last step: it comes after every step that counts, so it changes none of them. Its
        # episode-start flags are cleared: repeated, each would open a segment of its own and lengthen the pass.
        times = th.minimum(times, end.unsqueeze(1) - 1)
        rows = envs.unsqueeze(1).expand_as(times)
        steps = (times - self.history_length).clamp(min=0)  # rollout step (only read where ``mask``)
        obs = self._index_observations(times, rows)
        return ElmurRolloutBufferSamples(
            observations={k: self._flat(v) for k, v in obs.items()} if isinstance(obs, dict) else self._flat(obs),
            actions=self._flat(self.actions[steps, rows]),
            old_values=self._flat(self.value_estimates[steps, rows]),
            old_log_prob=self._flat(self.log_probs[steps, rows]),
            advantages=self._flat(self.advantages[steps, rows]),
            returns=self._flat(self.lambda_returns[steps, rows]),
            states=self.anchor_states(anchor, envs),
            episode_starts=self._flat(self.episode_starts[times, rows] & inside).float(),
            mask=self._flat(mask).float(),
        )

    # -- accounting -----------------------------------------------------------------------------------------

    def state_nbytes(self) -> int:
        """Bytes this buffer spends on recurrent state: anchors, their index, and the history's observations
        and episode starts (what a buffer without state would not hold)."""
        history = sum(t[: self.history_length].nbytes for t in [*self._observation_tensors(), self.episode_starts])
        anchors = sum(t.nbytes for t in (self.anchor_memory, self.anchor_positions, self.anchor_steps, self.anchor_previous))
        return anchors + self.anchor_slots.nbytes + self.next_slot.nbytes + history
