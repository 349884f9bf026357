"""Callbacks that log what ELMUR's memory does during training (TensorBoard, or any SB3 logger output)."""

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BaseModel
from stable_baselines3.common.utils import obs_as_tensor
from torch import nn

from sb3_elmur.common.backbone import ElmurBackbone
from sb3_elmur.common.checks import check_int
from sb3_elmur.common.memory import ElmurState
from sb3_elmur.common.model import ElmurModel


def memory_stats(state: ElmurState) -> Dict[str, np.ndarray]:
    """Per-layer sums over the written memory slots of a batch of ELMUR states.

    A slot is written when its position is >= 0. Its age is the number of steps between the newest
    processed token (step ``state.step - 1``) and the token the slot was last written at, so a slot
    written at the end of the segment that just completed has age 0.

    :param state: batched state (``memory [B, L, M, D]``, ``positions [B, L, M]``, ``step [B]``)
    :return: float64 arrays of shape [L]: ``norm_sum`` (sum of the L2 norms of written slots),
        ``age_sum`` (sum of their ages), ``written`` (number of written slots) and ``slots`` (number of slots)
    """
    written = state.positions >= 0  # [B, L, M]
    norms = state.memory.norm(dim=-1)  # [B, L, M]
    ages = (state.step.view(-1, 1, 1) - 1 - state.positions).to(norms.dtype)
    zero = th.zeros_like(norms)
    return {
        "norm_sum": th.where(written, norms, zero).sum(dim=(0, 2)).double().cpu().numpy(),
        "age_sum": th.where(written, ages, zero).sum(dim=(0, 2)).double().cpu().numpy(),
        "written": written.sum(dim=(0, 2)).double().cpu().numpy(),
        "slots": np.full(state.positions.shape[1], float(state.positions.shape[0] * state.positions.shape[2])),
    }


class ElmurTensorboardCallback(BaseCallback):
    """Log ELMUR-specific scalars once per rollout, next to SB3's own (``rollout/``, ``train/``).

    For a ``RecurrentPPO`` or ``ElmurPPO`` with an :class:`~sb3_elmur.common.policies.ElmurPolicy` (actor backbone),
    under ``elmur/``:

    - ``memory_norm``: mean L2 norm of the written memory slots (and ``memory_norm_layer<i>`` per layer);
    - ``slot_age``: mean age in steps of the written slots (step of the newest token minus the step the slot
      was last written at, 0 right after a write; ``slot_age_layer<i>``);
    - ``written_slots``: fraction of slots written at least once in the current episode;
    - ``memory_read_share``: how much the tokens' updates come from memory versus their own segment, as
      ``|read| / (|read| + |self-attention|)`` per token, where ``read`` and ``self-attention`` are the two
      attention sub-layers' residual outputs (``memory_read_share_layer<i>``). ELMUR normalises the two
      attentions separately, so this share of the residual update is the measure of memory use that does
      not depend on how the logits of two separate softmaxes compare.

    Memory norm, age and written fraction are averaged over the states the agent went through during the
    rollout (sampled every ``sample_freq`` steps). The read share is measured, every ``attention_freq``
    rollouts, by replaying the rollout that was just collected through the actor backbone with forward hooks
    on its attention sub-layers (one extra no-grad pass, about the cost of one training epoch's forward).

    :param sample_freq: sample the agents' states every this many environment steps (per env)
    :param attention_freq: measure the read share every this many rollouts (0: never)
    :param verbose: verbosity level
    """

    def __init__(self, sample_freq: int = 1, attention_freq: int = 1, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.sample_freq = check_int("sample_freq", sample_freq)
        self.attention_freq = check_int("attention_freq", attention_freq, minimum=0)
        self._sums: Optional[Dict[str, np.ndarray]] = None
        self._n_rollouts = 0

    @property
    def backbone(self) -> ElmurBackbone:
        return self.model.policy.lstm_actor  # type: ignore[union-attr]

    def _init_callback(self) -> None:
        backbone = getattr(self.model.policy, "lstm_actor", None)
        if not isinstance(backbone, ElmurBackbone):
            raise ValueError(
                "ElmurTensorboardCallback needs a RecurrentPPO or ElmurPPO model with an ElmurPolicy, got "
                f"{type(self.model).__name__} with {type(self.model.policy).__name__}"
            )

    def _on_rollout_start(self) -> None:
        self._sums = None

    def _on_step(self) -> bool:
        if self.n_calls % self.sample_freq != 0:
            return True
        # The states after this step's forward pass (``locals`` of collect_rollouts); before the first step
        # of a rollout only the model's last states exist.
        state = getattr(self.model, "acting_state", None)  # ElmurPPO keeps the typed state itself
        if state is None:
            lstm_states = self.locals.get("lstm_states", getattr(self.model, "_last_lstm_states", None))
            if lstm_states is None:
                return True
            state = self.backbone.unpack(lstm_states.pi)
        with th.no_grad():
            stats = memory_stats(state)
        if self._sums is None:
            self._sums = stats
        else:
            for key, value in stats.items():
                self._sums[key] = self._sums[key] + value
        return True

    def _on_rollout_end(self) -> None:
        self._n_rollouts += 1
        if self._sums is not None:
            self._record_memory(self._sums)
        if self.attention_freq > 0 and (self._n_rollouts - 1) % self.attention_freq == 0:
            shares = self.read_share_of_last_rollout()
            if shares is not None:
                self.logger.record("elmur/memory_read_share", float(np.mean(shares)))
                for layer, share in enumerate(shares):
                    self.logger.record(f"elmur/memory_read_share_layer{layer}", float(share))

    def _record_memory(self, sums: Dict[str, np.ndarray]) -> None:
        self.logger.record("elmur/written_slots", float(sums["written"].sum() / sums["slots"].sum()))
        # Norm and age are only defined over written slots: nothing is logged before the first write
        # (e.g. while every episode is still in its first segment), rather than a misleading 0.
        if sums["written"].sum() == 0:
            return
        self.logger.record("elmur/memory_norm", float(sums["norm_sum"].sum() / sums["written"].sum()))
        self.logger.record("elmur/slot_age", float(sums["age_sum"].sum() / sums["written"].sum()))
        for layer in range(len(sums["written"])):
            if sums["written"][layer] > 0:
                self.logger.record(f"elmur/memory_norm_layer{layer}", float(sums["norm_sum"][layer] / sums["written"][layer]))
                self.logger.record(f"elmur/slot_age_layer{layer}", float(sums["age_sum"][layer] / sums["written"][layer]))

    def read_share_of_last_rollout(self) -> Optional[List[float]]:
        """Replay the rollout buffer's sequences through the actor backbone and measure, per layer, the mean
        over real tokens of ``|read| / (|read| + |self-attention|)``.

        :return: one share per layer, or None if the model has no memory read (``use_memory_read=False``)
        """
        buffer = self.model.rollout_buffer
        # Only between the end of a rollout and training: sb3-contrib's get() reorders its arrays in place.
        if not buffer.full or getattr(buffer, "generator_ready", False):
            return None
        records = AttentionRecorder(self.backbone.model)
        try:
            with th.no_grad():
                if hasattr(buffer, "samples"):  # ElmurPPO's ElmurRolloutBuffer (common/ does not import ppo/)
                    # Its training sequences, all at once. They hold steps that are not the rollout's, or not once:
                    # burn-in steps before a sequence (an earlier sequence's, or the previous rollout's) and padding
                    # that repeats a row's last step; only the steps the losses count (``mask``) are measured.
                    data = buffer.samples()
                    n_rows = data.states.step.shape[0]
                    starts = data.episode_starts.reshape(n_rows, -1) > 0.5
                    records.token_mask = data.mask.reshape(n_rows, -1) > 0.5
                    self.model.policy.backbone_sequences(data.observations, data.states, starts)
                else:
                    self.backbone(*self._rollout_inputs())
        finally:
            records.remove()
        return records.read_shares()

    def _rollout_inputs(self) -> Tuple[th.Tensor, Tuple[th.Tensor, th.Tensor], th.Tensor]:
        """Features [n_envs * n_steps, F] (env-major, as the backbone takes sequences), the states at the
        start of the rollout and the episode starts of the buffer."""
        buffer = self.model.rollout_buffer
        policy = self.model.policy

        def env_major(array: np.ndarray) -> np.ndarray:
            return array.swapaxes(0, 1).reshape(-1, *array.shape[2:])

        if isinstance(buffer.observations, dict):
            observations: Any = {key: env_major(value) for key, value in buffer.observations.items()}
        else:
            observations = env_major(buffer.observations)
        obs_tensor = obs_as_tensor(observations, policy.device)
        # The actor's features extractor, whether or not it is shared with the critic.
        features = BaseModel.extract_features(policy, obs_tensor, policy.pi_features_extractor)
        device = features.device
        packed = (
            th.as_tensor(buffer.hidden_states_pi[0], device=device),
            th.as_tensor(buffer.cell_states_pi[0], device=device),
        )
        starts = th.as_tensor(env_major(buffer.episode_starts), dtype=th.float32, device=device)
        return features, packed, starts


class AttentionRecorder:
    """Forward hooks on an ELMUR model's attention sub-layers: per-token norms of their residual outputs, in its
    segment-parallel passes (calls of more than one step).

    ``ElmurModel`` lays a pass's tokens out as a grid of segments [N, S, K] that is zero where no token exists
    (after a row's last step, and whole segments of rows that have fewer segments than others); self-attention
    runs on the whole grid per layer, the memory read on one segment at a time. A pre-hook on the model records
    which grid positions hold tokens; of those, only the ones :attr:`token_mask` marks count, if set.

    :param model: the ELMUR model (``ElmurModel``); call :meth:`remove` when done
    """

    #: [N, T] bool for the inputs of the next passes: the steps to measure (None: every step). Steps that are in a
    #: pass only as context (burn-in, padding) change the tokens after them but are not measured themselves.
    token_mask: Optional[th.Tensor] = None

    def __init__(self, model: ElmurModel) -> None:
        self.n_layers = len(model.layers)
        self.valid: List[th.Tensor] = []  # per pass, the flat mask of grid positions that hold tokens
        self.self_norms: List[List[th.Tensor]] = [[] for _ in model.layers]  # per layer, per pass, flat norms
        self.read_norms: List[List[th.Tensor]] = [[] for _ in model.layers]
        self._grid: Optional[th.Tensor] = None  # the current pass's [N, S, K] mask
        self._self_outputs: List[List[th.Tensor]] = [[] for _ in model.layers]
        self._read_outputs: List[List[th.Tensor]] = [[] for _ in model.layers]
        self.handles = [model.register_forward_pre_hook(self._start_pass, with_kwargs=True),
                        model.register_forward_hook(self._end_pass)]
        for index, layer in enumerate(model.layers):
            self.handles.append(layer.self_attn.register_forward_hook(self._recorder(self._self_outputs[index])))
            self.handles.append(layer.read.register_forward_hook(self._recorder(self._read_outputs[index])))

    def _start_pass(self, model: ElmurModel, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        inputs = dict(zip(("x", "state", "episode_starts"), args), **kwargs)
        x, state, starts = inputs["x"], inputs["state"], inputs.get("episode_starts")
        for outputs in self._self_outputs + self._read_outputs:
            outputs.clear()
        self._grid = None
        if x.dim() != 3 or x.shape[1] < 2:  # a single step: the acting path, not a grid
            return
        n, t = x.shape[:2]
        starts = th.zeros(n, t, dtype=th.bool, device=x.device) if starts is None else starts.to(x.device, th.bool)
        plan = model._plan(state.step, starts)
        grid = th.zeros(n, plan.reset.shape[1], model.config.context_length, dtype=th.bool, device=x.device)
        tokens = th.ones_like(starts) if self.token_mask is None else self.token_mask.to(x.device, th.bool)
        if tokens.shape != starts.shape:
            raise ValueError(f"AttentionRecorder.token_mask has shape {tuple(tokens.shape)}, the pass's inputs are "
                             f"{tuple(starts.shape)} (rows, steps)")
        self._grid = grid.index_put(plan.grid_index(), tokens)

    def _end_pass(self, model: ElmurModel, args: Tuple[Any, ...], output: Any) -> None:
        if self._grid is None:
            return
        n, n_segments, k = self._grid.shape
        self.valid.append(self._grid.flatten())
        for index in range(self.n_layers):
            # Self-attention saw the grid as [N * S, K]; the read one segment [N, K] at a time.
            self.self_norms[index].append(th.cat(self._self_outputs[index]).view(n, n_segments, k).flatten())
            if self._read_outputs[index]:
                self.read_norms[index].append(th.stack(self._read_outputs[index], dim=1).flatten())
        self._grid = None

    @staticmethod
    def _recorder(store: List[th.Tensor]):
        def hook(module: nn.Module, args: Tuple[Any, ...], output: th.Tensor) -> None:
            store.append(output.norm(dim=-1))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    @property
    def n_tokens(self) -> int:
        """Number of token positions seen (each position once, whatever the number of layers)."""
        return int(sum(int(mask.sum()) for mask in self.valid))

    def read_shares(self) -> Optional[List[float]]:
        """Per layer, the mean over tokens of ``|read| / (|read| + |self-attention|)`` (None without memory read)."""
        if not self.valid or not self.read_norms[0]:
            return None
        valid = th.cat(self.valid)
        shares = []
        for self_norms, read_norms in zip(self.self_norms, self.read_norms):
            self_norm, read_norm = th.cat(self_norms), th.cat(read_norms)
            share = read_norm / (read_norm + self_norm).clamp(min=1e-12)
            shares.append(float(share[valid].mean()))
        return shares


__all__ = ["AttentionRecorder", "ElmurTensorboardCallback", "memory_stats"]
