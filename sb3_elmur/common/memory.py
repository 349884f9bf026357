"""ELMUR's recurrent state (:class:`ElmurState`) and the LRU rule that picks the slot a segment writes."""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F


class ElmurState(NamedTuple):
    """Recurrent state of :class:`ElmurModel`, batched along the first dimension.

    ``memory`` [B, L, M, D] slot vectors; ``positions`` [B, L, M] step of each slot's last write (-1 = empty);
    ``segment`` [B, K-1, D] input tokens of the current, incomplete segment (the first ``step % K`` are
    valid, the rest zeros); ``step`` [B] steps taken in the current episode; ``previous`` [B, L, Kp, D] every
    layer's inputs over the last completed segment of the episode, which cross-segment attention attends to (Kp = 0,
    an empty tensor, without it; zeros where the episode has completed no segment). L counts every layer that owns a
    memory: the trained ones, then the reservoir's (``ElmurConfig.memory_layers``).
    """

    memory: torch.Tensor
    positions: torch.Tensor
    segment: torch.Tensor
    step: torch.Tensor
    previous: torch.Tensor


def select_rows(rows: torch.Tensor, new: ElmurState, old: ElmurState) -> ElmurState:
    """The state of ``new`` where ``rows`` [B] is True, of ``old`` elsewhere."""
    return ElmurState(*(torch.where(rows.view(-1, *[1] * (a.dim() - 1)), b, a) for a, b in zip(old, new)))


def lru_weights(
    positions: torch.Tensor,
    newest_step: torch.Tensor,
    alpha: float,
    hard_write_empty: bool = True,
    rows: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The LRU choice: one slot per memory, the first never-written slot, else the least recently written one.

    It depends on slot positions only, never on memory content.

    :param positions: [N, ..., M] step of each slot's last write, -1 for never written
    :param newest_step: [N] step of the newest token of the segment being written
    :param alpha: blend factor: ``slot <- alpha * candidate + (1 - alpha) * slot``
    :param hard_write_empty: write the candidate as is into a never-written slot
    :param rows: [N] bool, the rows that write (the others keep their memory and positions); None: all
    :return: blend weight of every slot [N, ..., M] (0 for the slots left as they are) and the new positions
    """
    n_slots = positions.shape[-1]
    leading = (positions.shape[0],) + (1,) * (positions.dim() - 1)
    slot_index = torch.arange(n_slots, device=positions.device)
    empty = positions < 0
    # Empty slots get keys below every valid position, in slot order, so argmin picks the first empty one.
    key = torch.where(empty, slot_index - n_slots - 1, positions)
    chosen = F.one_hot(key.argmin(dim=-1), n_slots).bool()
    if rows is not None:
        chosen = chosen & rows.view(leading)
    weight = torch.where(empty, 1.0, alpha) if hard_write_empty else alpha
    weight = torch.where(chosen, weight, 0.0)
    new_positions = torch.where(chosen, newest_step.view(leading).to(positions.dtype), positions)
    return weight, new_positions


def lru_write(
    memory: torch.Tensor,
    positions: torch.Tensor,
    candidates: torch.Tensor,
    newest_step: torch.Tensor,
    alpha: float,
    hard_write_empty: bool = True,
    rows: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Write one slot per row, chosen by :func:`lru_weights` (which see for the other parameters).

    :param memory: [N, M, D] slot vectors; :param positions: [N, M]
    :param candidates: [N, M, D] candidate content for every slot (only the chosen one is used)
    :return: new memory and positions
    """
    weight, new_positions = lru_weights(positions, newest_step, alpha, hard_write_empty, rows)
    return _blend(memory, candidates, weight), new_positions


def _blend(memory: torch.Tensor, candidates: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # lerp is exact at weights 0 and 1: unchosen slots stay bit for bit, hard writes copy the candidate.
    return torch.lerp(memory, candidates, weight.to(memory.dtype).unsqueeze(-1))

