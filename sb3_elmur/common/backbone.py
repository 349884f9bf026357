"""The ELMUR backbone of a policy, and the packed form of its state that sb3-contrib's RecurrentPPO carries.

sb3-contrib's algorithm and rollout buffer know one recurrent state: an LSTM-shaped pair (hidden, cell) of
float32 tensors ``[num_layers, n_envs, hidden_size]``. :class:`ElmurBackbone` packs ELMUR's state into that
pair and unpacks it exactly, and exposes ``num_layers`` / ``hidden_size`` where ``RecurrentPPO`` reads them
(``policy.lstm_actor``), so the stock algorithm runs unchanged.
"""

import warnings
import zlib
from typing import Any, Tuple

import torch as th
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from torch import nn

from sb3_elmur.common.checks import RecurrentStateError
from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.memory import ElmurState, select_rows
from sb3_elmur.common.model import ElmurModel

# float32 holds every integer up to 2**24 exactly: slot positions and step counters stay exact up to there.
MAX_EXACT_STEP = 2**24
# Below this many parameters, torch's intra-op threads cost more than they save (see ElmurBackbone.forward).
SMALL_MODEL_PARAMETERS = 1_000_000


def layout_tag(config: ElmurConfig) -> int:
    """Tag of a packed state layout: a nonzero integer below 2**23 (exact in float32), from the config's sizes.

    0 is left for fresh rows. Two layouts share a tag with probability about 1e-7.
    """
    key = f"elmur-state-v1:{config.n_layers},{config.memory_size},{config.d_model},{config.context_length}"
    if config.previous_length:  # layouts without cross-segment attention keep the tags they always had
        key += f",previous={config.previous_length}"
    if config.reservoir_layers:  # and so do those without a reservoir
        key += f",reservoir={config.reservoir_layers}"
    return zlib.crc32(key.encode()) % (2**23 - 1) + 1


def fresh_recurrent_state(policy: RecurrentActorCriticPolicy, n: int, device: th.device) -> Tuple[th.Tensor, th.Tensor]:
    """The packed (hidden, cell) state of ``n`` fresh episodes for any RecurrentPPO policy: all zeros is a fresh
    episode for ELMUR and the LSTM alike, so no reset flags are needed."""
    shape = (policy.lstm_hidden_state_shape[0], n, policy.lstm_hidden_state_shape[2])
    return th.zeros(shape, device=device), th.zeros(shape, device=device)



class ElmurBackbone(nn.Module):
    """ELMUR model with its state packed as an LSTM-shaped (hidden, cell) pair.

    Packed layout of one row (``state_size`` floats, split in two halves, zero-padded):
    ``[layout tag, step, positions (L*M), memory (L*M*D), segment tokens ((K-1)*D), previous segment (L*Kp*D)]``
    (Kp = K with cross-segment attention, else 0; :meth:`ElmurConfig.state_fields` is that list). The tag (see
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
        # The layout tag, then the state's fields in ElmurConfig's order, one float each element.
        self._sizes = [1] + [count for _, count, _ in config.state_fields()]
        self.state_size = sum(self._sizes)
        self.hidden_size = (self.state_size + 1) // 2
        self._padding = 2 * self.hidden_size - self.state_size
        self.layout_tag = layout_tag(config)
        self._threads_checked = False

    @property
    def input_size(self) -> int:
        return self.model.input_dim

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
                f"(it expects a state made by an ElmurPolicy with {self.model.config.describe()})"
            )

    def pack(self, state: ElmurState) -> Tuple[th.Tensor, th.Tensor]:
        """ElmurState -> (hidden, cell), each [1, N, hidden_size] float32."""
        n = state.step.shape[0]
        # One cat does it all (it runs every rollout step): it promotes the integer fields to float32, and
        # the tag and padding come in as parts.
        parts = [state.memory.new_full((n, 1), self.layout_tag), state.step.view(n, 1), state.positions.reshape(n, -1),
                 state.memory.reshape(n, -1), state.segment.reshape(n, -1), state.previous.reshape(n, -1)]
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
        tag, step, positions, memory, segment, previous = flat.split(self._sizes, dim=1)
        # Steps and positions are integers stored exactly (below MAX_EXACT_STEP): no rounding needed.
        decoded = ElmurState(
            memory=memory.reshape(n, c.memory_layers, c.memory_size, c.d_model),
            positions=positions.long().reshape(n, c.memory_layers, c.memory_size),
            segment=segment.reshape(n, c.context_length - 1, c.d_model),
            step=step[:, 0].long(),
            previous=previous.reshape(n, c.memory_layers, c.previous_length, c.d_model),
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
                f"this state was not made by an ElmurPolicy with {self.model.config.describe()}: row {row} has layout tag "
                f"{float(tag[row, 0])!r}, expected {self.layout_tag} (or 0 for a fresh row). Pass the state that this "
                "policy returned, or None to start new episodes."
            )
        init = self.model.initial_state(n, flat.device)
        return select_rows(fresh, init, decoded)

    def forward(
        self, features: th.Tensor, packed: Tuple[th.Tensor, th.Tensor], episode_starts: th.Tensor
    ) -> Tuple[th.Tensor, Tuple[th.Tensor, th.Tensor]]:
        """Same contract as ``RecurrentActorCriticPolicy._process_sequence``: flat [N * T, F] features of
        N sequences of T steps (N from the state's batch size) -> flat [N * T, output_dim] latents."""
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


