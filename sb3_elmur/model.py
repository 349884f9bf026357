"""ELMUR: External Layer Memory with Update/Rewrite, in plain PyTorch.

Every transformer layer owns M memory slots. Tokens of a segment (K consecutive steps) read the memory
through cross-attention; when a segment is complete, the layer's output tokens are written into one slot
chosen by an LRU rule (first empty slot, else the least recently written), by convex blending.

The model is a recurrent function of (inputs, state): processing T steps one call at a time or in a single
call gives the same outputs and final state. A long sequence is processed segment-parallel: one batched
pass per segment, causal inside it. The model's specification, and where it departs from
the paper and the authors' code: ``docs/model.md``.

This module has no dependency on Stable-Baselines3.
"""

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DISTANCE_BIAS_MODES = ("clamped", "log")
EMPTY_SLOT_WRITE_MODES = ("hard", "blend")
NORM_MODES = ("pre", "post")


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Validate an integer argument: any integral number (a numpy integer too, but not a bool) >= ``minimum``.

    :param name: name of the argument, for the error message
    :param value: the value to check
    :param minimum: smallest allowed value
    :return: ``value`` as a plain ``int``
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any) -> float:
    """Validate a float argument: any finite real number (a numpy float too, but not a bool).

    :param name: name of the argument, for the error message
    :param value: the value to check
    :return: ``value`` as a plain ``float``
    """
    # A non-finite hyper-parameter (inf std, nan dropout) only shows up later as NaN outputs: refuse it here.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class InsufficientMemoryError(MemoryError, ValueError):
    """A size argument asks for more memory than the machine has: refused before allocating, where the allocation
    would end in an out-of-memory kill or a bare allocator error. A ValueError too (the argument is the cause)."""


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` in decimal units (kB, MB, GB, ...), for messages."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n_bytes < 1000 or unit == "PB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def available_memory_bytes(device: Optional[torch.device] = None) -> Optional[int]:
    """Memory available for new tensors on ``device``: the free memory of a CUDA device; on CPU, the kernel's
    estimate of available RAM (``MemAvailable`` of /proc/meminfo, Linux), else the physical RAM (``os.sysconf``).

    :param device: where the tensors go (None: CPU)
    :return: bytes, or None where it cannot be told
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError):  # no CUDA, or no such device: the move fails by itself
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(n_bytes: int, what: str, advice: str, device: Optional[torch.device] = None) -> None:
    """Refuse an allocation of about ``n_bytes`` that cannot fit, before it is tried.

    :param n_bytes: the estimated need
    :param what: what needs it and why, for the message (names the arguments that set the size)
    :param advice: what to change, for the message
    :param device: where it would be allocated (None: CPU)
    :raises InsufficientMemoryError: ``n_bytes`` is more than :func:`available_memory_bytes` of ``device``
    """
    available = available_memory_bytes(device)
    if available is not None and n_bytes > available:
        where = "RAM" if device is None or torch.device(device).type == "cpu" else f"free memory on {device}"
        raise InsufficientMemoryError(
            f"{what} needs about {format_bytes(n_bytes)}, more than the {format_bytes(available)} of {where} "
            f"available: {advice}"
        )


def check_bool(name: str, value: Any) -> bool:
    """Validate a boolean argument: True or False (a numpy bool too).

    :param name: name of the argument, for the error message
    :param value: the value to check
    :return: ``value`` as a plain ``bool``
    """
    # A string such as "False" or "no" (from a config file or a command line) would silently count as True.
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_max_grad_norm(value: Any, name: str = "max_grad_norm") -> float:
    """Validate a gradient-clipping norm: a finite number > 0.

    :param value: the value to check
    :param name: name of the argument, for the error message
    :return: ``value`` as a plain ``float``
    """
    # torch's clip_grad_norm_ scales the gradient by max_norm / norm: a negative norm turns descent into ascent,
    # 0 zeroes every gradient (no learning). Neither is an error there.
    value = check_float(name, value)
    if value <= 0.0:
        raise ValueError(f"{name} must be > 0 (the largest gradient norm kept), got {value!r}")
    return value


@dataclass
class ElmurConfig:
    """Hyper-parameters of :class:`ElmurModel`.

    :param d_model: token and memory width D
    :param n_layers: number of transformer layers L (each owns its memory)
    :param n_heads: attention heads H (must divide ``d_model``)
    :param memory_size: memory slots per layer M
    :param context_length: segment length K (the attention window, in steps)
    :param alpha: LRU blend factor in (0, 1]: ``slot <- alpha * new + (1 - alpha) * slot``; 1 replaces
    :param empty_slot_write: "hard" writes the candidate into a never-written slot (the paper);
        "blend" blends it with the initial content like any other slot (the reference code)
    :param memory_init_std: std of the fixed initial memory content (0 = zeros). It is drawn once at
        construction and stored as a buffer, so every episode start resets to the same content.
    :param dropout: dropout on residual branches
    :param attn_dropout: dropout on attention weights
    :param memory_dropout: dropout on the memory vectors the tokens read
    :param norm: "pre" (LayerNorm before each sub-layer) or "post" (after the residual sum)
    :param mlp_ratio: hidden width of the feed-forward blocks, as a multiple of ``d_model``
    :param distance_bias: "log" (T5-style log buckets: ages stay distinguishable up to ``max_distance``)
        or "clamped" (one entry per step up to ``max_distance``, the reference code's table)
    :param max_distance: largest distance the bias tells apart, in steps (default: 2**24 for "log",
        1023 for "clamped", the reference code's table size)
    :param distance_buckets: number of buckets in "log" mode (the first ``distance_buckets // 4`` are exact)
    :param use_memory_read: ablation switch for the memory read
    :param use_memory_write: ablation switch for the memory write (memory then stays at its initial value)
    :param use_distance_bias: ablation switch for the distance bias of read and write
    :param detach_memory: cut gradients between segments (the reference code's behaviour)
    """

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    memory_size: int = 2
    context_length: int = 10
    alpha: float = 1.0
    empty_slot_write: str = "hard"
    memory_init_std: float = 0.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    memory_dropout: float = 0.0
    norm: str = "post"
    mlp_ratio: int = 4
    distance_bias: str = "log"
    max_distance: Optional[int] = None
    distance_buckets: int = 64
    use_memory_read: bool = True
    use_memory_write: bool = True
    use_distance_bias: bool = True
    detach_memory: bool = False

    def __post_init__(self) -> None:
        if self.max_distance is None:
            self.max_distance = 2**24 if self.distance_bias == "log" else 1023
        # Store plain Python types: numpy scalars would be saved as such and compare oddly later.
        for name in ("d_model", "n_layers", "n_heads", "memory_size", "context_length", "mlp_ratio", "max_distance"):
            setattr(self, name, check_int(f"ElmurConfig.{name}", getattr(self, name)))
        self.distance_buckets = check_int("ElmurConfig.distance_buckets", self.distance_buckets)
        for name in ("alpha", "memory_init_std", "dropout", "attn_dropout", "memory_dropout"):
            setattr(self, name, check_float(f"ElmurConfig.{name}", getattr(self, name)))
        for name in ("use_memory_read", "use_memory_write", "use_distance_bias", "detach_memory"):
            setattr(self, name, check_bool(f"ElmurConfig.{name}", getattr(self, name)))
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"ElmurConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"ElmurConfig.alpha must be in (0, 1], got {self.alpha!r}")
        for name, allowed in (
            ("empty_slot_write", EMPTY_SLOT_WRITE_MODES),
            ("norm", NORM_MODES),
            ("distance_bias", DISTANCE_BIAS_MODES),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"ElmurConfig.{name} must be one of {allowed}, got {value!r}")
            setattr(self, name, str(value))
        for name in ("dropout", "attn_dropout", "memory_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ElmurConfig.{name} must be in [0, 1), got {value!r}")
        if self.memory_init_std < 0.0:
            raise ValueError(f"ElmurConfig.memory_init_std must be >= 0, got {self.memory_init_std!r}")
        if self.distance_bias == "log" and not 8 <= self.distance_buckets <= self.max_distance:
            raise ValueError(
                f"ElmurConfig.distance_buckets must be in [8, max_distance], got {self.distance_buckets!r}"
            )

    @property
    def n_distance_buckets(self) -> int:
        """Entries of each distance-bias table (see :class:`DistanceBias`)."""
        return self.max_distance + 1 if self.distance_bias == "clamped" else self.distance_buckets

    def model_bytes(self, input_dim: int = 0) -> List[Tuple[int, str]]:
        """Bytes an :class:`ElmurModel` of this config allocates (parameters, buffers and the temporary of the
        initial memory), in parts, each with the argument that sets it, largest first.

        :param input_dim: size of each step's input vector
        :return: ``[(bytes, "argument=value: what"), ...]``
        """
        d, k, h, r = self.d_model, self.context_length, self.n_heads, self.mlp_ratio
        n, m = self.n_layers, self.memory_size
        # Per layer: four attentions (q, kv, proj: 4 D^2 + 4 D each), two MLPs, layer norms; float32.
        weights = n * (4 * (4 * d * d + 4 * d) + 2 * (2 * r * d * d + r * d + d) + 12 * d) * 4
        # Per layer: the relative bias and the [K, K] offsets (int64) and causal mask (float32).
        segment = n * (h * k * 4 + k * k * 12)
        parts = [
            (weights, f"d_model={d}: {n} layers of about {4 * (4 + r)} x d_model**2 weights"),
            (2 * n * m * d * 4, f"memory_size={m}: the initial memory, n_layers x memory_size x d_model floats"),
            (segment, f"context_length={k}: per layer, context_length**2 attention offsets and mask"),
            (input_dim * d * 4 + d * 4, f"input_dim={input_dim}: the input embedding, input_dim x d_model weights"),
        ]
        if self.distance_bias == "clamped":
            parts.append((n * 2 * self.n_distance_buckets * h * 4, f"max_distance={self.max_distance}: per layer, "
                                                                   "two distance-bias tables of max_distance + 1 rows"))
        else:
            parts.append((n * 2 * self.n_distance_buckets * (h * 4 + 8), f"distance_buckets={self.distance_buckets}"))
        return sorted(parts, reverse=True)

    def state_bytes(self) -> int:
        """Bytes of one row of :class:`ElmurState` (memory, slot positions, segment tokens, step)."""
        n, m, d = self.n_layers, self.memory_size, self.d_model
        return n * m * d * 4 + n * m * 8 + (self.context_length - 1) * self.d_model * 4 + 8

    def describe(self) -> str:
        """The size fields, for messages."""
        return (f"ElmurConfig(d_model={self.d_model}, n_layers={self.n_layers}, memory_size={self.memory_size}, "
                f"context_length={self.context_length})")

    def check_memory(self, input_dim: int = 0, n_states: int = 0, copies: int = 1, what: str = "ElmurModel") -> None:
        """Refuse a config whose model (and states) cannot fit in RAM, naming the argument that asks the most.

        :param input_dim: size of each step's input vector
        :param n_states: rows of :class:`ElmurState` to count besides the model
        :param copies: copies of the parameters to count (e.g. 4 for training: parameters, gradients and Adam's
            two moments)
        :param what: who allocates, for the message
        :raises InsufficientMemoryError: it does not fit
        """
        parts = self.model_bytes(input_dim)
        weights = next(size for size, name in parts if name.startswith("d_model="))
        state = n_states * self.state_bytes()
        total = sum(size for size, _ in parts) + (copies - 1) * weights + state
        largest = parts[0][1]
        if state > parts[0][0]:
            largest = (f"memory_size={self.memory_size} and context_length={self.context_length}: {n_states} "
                       f"recurrent state(s) of {format_bytes(self.state_bytes())} each")
        check_memory(total, f"{what} with {self.describe()} (mostly {largest})",
                     f"reduce {largest.split('=')[0]}")


class ElmurState(NamedTuple):
    """Recurrent state of :class:`ElmurModel`, batched along the first dimension.

    ``memory`` [B, L, M, D] slot vectors; ``positions`` [B, L, M] step of each slot's last write (-1 = empty);
    ``segment`` [B, K-1, D] input tokens of the current, incomplete segment (the first ``step % K`` are
    valid, the rest zeros); ``step`` [B] steps taken in the current episode.
    """

    memory: torch.Tensor
    positions: torch.Tensor
    segment: torch.Tensor
    step: torch.Tensor


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


class DistanceBias(nn.Module):
    """Learned per-head additive attention bias indexed by the age of a memory slot (in steps).

    Bucket 0 is reserved for never-written slots. Initialised at zero, so ages never seen in training
    add nothing rather than noise.
    """

    def __init__(self, config: ElmurConfig) -> None:
        super().__init__()
        self.mode = config.distance_bias
        self.max_distance = config.max_distance
        if self.mode == "clamped":
            n_buckets = config.max_distance + 1
            self.n_exact = config.max_distance + 1
        else:
            n_buckets = config.distance_buckets
            self.n_exact = config.distance_buckets // 4
        self.n_buckets = n_buckets
        self.table = nn.Parameter(torch.zeros(n_buckets, config.n_heads))
        if self.mode == "log":
            # Smallest distance of every bucket 1..n_buckets-1: a searchsorted then replaces the log formula
            # (acting calls this twice per layer and step; the result is the same, see tests/test_model.py).
            self.register_buffer("bucket_starts", self._bucket_starts(), persistent=False)

    def _log_index(self, distance: torch.Tensor) -> torch.Tensor:
        """Bucket of integer distances >= 1 by the log formula."""
        log_ratio = torch.log(distance.float() / self.n_exact) / math.log(self.max_distance / self.n_exact)
        log_index = self.n_exact + (log_ratio * (self.n_buckets - self.n_exact)).long()
        return torch.where(distance < self.n_exact, distance, log_index.clamp(max=self.n_buckets - 1))

    def _bucket_starts(self) -> torch.Tensor:
        # Binary search, for all buckets at once, of the first distance whose index reaches the bucket.
        target = torch.arange(1, self.n_buckets)
        low, high = torch.ones_like(target), torch.full_like(target, 2**40)
        while bool((low < high).any()):
            middle = (low + high) // 2
            reached = self._log_index(middle) >= target
            high, low = torch.where(reached, middle, high), torch.where(reached, low, middle + 1)
        return low

    def bucket(self, distance: torch.Tensor, empty: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bucket index of integer distances >= 1 (bucket 0 where ``empty``, a mask broadcastable to them)."""
        distance = distance.clamp(min=1)
        if self.mode == "clamped":
            index = distance.clamp(max=self.max_distance)
        else:
            # Distances below n_exact get their own bucket; above, buckets are log-spaced up to max_distance.
            index = torch.searchsorted(self.bucket_starts, distance, right=True)
        return index if empty is None else index.masked_fill(empty, 0)

    def forward(self, distance: torch.Tensor, empty: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:return: bias [..., H] for integer distances [...]."""
        return self.table[self.bucket(distance, empty)]


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # No call at all when inactive: acting runs a dozen of these per step, each a no-op module call in eval.
    return F.dropout(x, p, training=True) if training and p > 0.0 else x


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():
        # With gradients, torch's fused softmax wins: its backward is one op, this form's four (measured: 50
        # against 87 us forward and backward for [4, 2, 10, 10] scores).
        return torch.softmax(scores, dim=-1)
    # Without, for acting, torch's softmax kernel is slow on CPU for rows of a few entries (6x slower than this).
    exp = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    return exp / exp.sum(dim=-1, keepdim=True)


class Attention(nn.Module):
    """Multi-head attention whose scores take an additive bias (position, distance and causal masks)."""

    # Fused attention (F.scaled_dot_product_attention): None picks it on GPU, where it is faster; on CPU the
    # explicit form below is faster for segments of a few tokens.
    fused: Optional[bool] = None

    def __init__(self, config: ElmurConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.query = nn.Linear(config.d_model, config.d_model)
        self.key_value = nn.Linear(config.d_model, 2 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.attn_dropout, self.dropout = config.attn_dropout, config.dropout

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """:param queries: [N, Tq, D]; :param keys: [N, Tk, D]; :param bias: [N or 1, H, Tq, Tk] or None."""
        n, tq, d = queries.shape
        h = self.n_heads
        scale = 1.0 / math.sqrt(d // h)
        q = self.query(queries).view(n, tq, h, d // h).transpose(1, 2)
        k, v = self.key_value(keys).view(n, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # [N, H, Tk, D / H]
        if self.fused if self.fused is not None else queries.is_cuda:
            p = self.attn_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=scale)
            return _dropout(self.proj(out.transpose(1, 2).reshape(n, tq, d)), self.dropout, self.training)
        # Explicit attention: on CPU, for segments of a few tokens, it is several times faster than
        # F.scaled_dot_product_attention's flash kernel. For one or two queries (acting, memory writes),
        # broadcast products beat bmm over N * H tiny matrices by about 2x (measured).
        few = tq <= 2
        scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) if few else q @ k.transpose(-1, -2)
        scores = scores * scale
        if bias is not None:  # added second, so that the sum keeps the layout of the scores, not the bias's
            scores = scores + bias
        weights = _dropout(_softmax(scores), self.attn_dropout, self.training)
        out = (weights.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2) if few else weights @ v
        return _dropout(self.proj(out.transpose(1, 2).reshape(n, tq, d)), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: ElmurConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.net = nn.Sequential(nn.Linear(config.d_model, hidden), nn.GELU(), nn.Linear(hidden, config.d_model))
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(self.net(x), self.dropout, self.training)


class ElmurLayer(nn.Module):
    """One layer: causal self-attention, memory read, feed-forward; and the write candidate for its memory."""

    def __init__(self, config: ElmurConfig) -> None:
        super().__init__()
        self.config = config
        d, k = config.d_model, config.context_length
        self.self_attn, self.ln_self_attn = Attention(config), nn.LayerNorm(d)
        self.read, self.ln_read = Attention(config), nn.LayerNorm(d)
        self.mlp, self.ln_mlp = MLP(config), nn.LayerNorm(d)
        self.write, self.ln_write = Attention(config), nn.LayerNorm(d)
        self.memory_mlp, self.ln_memory_mlp = MLP(config), nn.LayerNorm(d)
        # Ends every write in a LayerNorm (also in pre-norm mode), so that blended slots stay bounded.
        self.ln_candidate = nn.LayerNorm(d) if config.norm == "pre" else nn.Identity()
        self.read_bias = DistanceBias(config)
        self.write_bias = DistanceBias(config)
        # Relative position bias inside a segment (depends on i - j only), with the causal mask built in.
        self.relative_bias = nn.Parameter(torch.zeros(config.n_heads, k))
        offsets = torch.arange(k).view(k, 1) - torch.arange(k).view(1, k)
        self.register_buffer("offsets", offsets.clamp(min=0), persistent=False)
        # Additive causal mask (0 or -inf): one add per call instead of inverting and filling a bool mask.
        self.register_buffer("causal_mask", torch.zeros(k, k).masked_fill(offsets < 0, float("-inf")), persistent=False)

    def _sublayer(self, x: torch.Tensor, norm: nn.Module, fn) -> torch.Tensor:
        if self.config.norm == "pre":
            return x + fn(norm(x))
        return norm(x + fn(x))

    def memory_bias(
        self, token_steps: torch.Tensor, positions: torch.Tensor, slots_query: bool
    ) -> Optional[torch.Tensor]:
        """Distance bias between tokens [N, T] and slots [N, M]: of the read [N, H, T, M] or, if ``slots_query``,
        of the write [N, H, M, T]; None without distance bias (or without a read, for the read's)."""
        if not self.config.use_distance_bias or not (slots_query or self.config.use_memory_read):
            return None
        distance = token_steps.unsqueeze(-1) - positions.unsqueeze(-2)  # [N, T, M]
        if slots_query:
            return self.write_bias(distance).permute(0, 3, 2, 1)
        # An empty slot writes as if last written at step -1, so its first write can still tell the segment's
        # tokens apart by position; tokens read an empty slot through the "empty" bucket 0.
        return self.read_bias(distance, (positions < 0).unsqueeze(-2)).permute(0, 3, 1, 2)

    def forward(
        self,
        x: torch.Tensor,
        token_steps: torch.Tensor,
        memory: torch.Tensor,
        positions: torch.Tensor,
        query_offsets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """:param x: [N, K, D] segment tokens; :param token_steps: [N, K] their steps in the episode;
        :param memory: [N, M, D]; :param positions: [N, M];
        :param query_offsets: [N] if given, compute the output of that one position per row only (acting).
        :return: output tokens [N, K, D] (or [N, 1, D] at ``query_offsets``)."""
        if query_offsets is not None:
            token_steps = token_steps[torch.arange(x.shape[0], device=x.device), query_offsets].unsqueeze(1)
        read_bias = self.memory_bias(token_steps, positions, slots_query=False)
        return self.read_memory(self.self_attend(x, query_offsets), memory, read_bias)

    def self_attend(self, x: torch.Tensor, query_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal self-attention sub-layer over segments x [N, K, D] (at ``query_offsets`` [N] only: [N, 1, D])."""
        causal_bias = self.relative_bias[:, self.offsets] + self.causal_mask  # [H, K, K]
        if query_offsets is None:
            return self._sublayer(x, self.ln_self_attn, lambda h: self.self_attn(h, h, causal_bias.unsqueeze(0)))
        context = self.ln_self_attn(x) if self.config.norm == "pre" else x
        causal_bias = causal_bias[:, query_offsets].transpose(0, 1).unsqueeze(2)  # [N, H, 1, K]
        x = x[torch.arange(x.shape[0], device=x.device), query_offsets].unsqueeze(1)
        return self._sublayer(x, self.ln_self_attn, lambda h: self.self_attn(h, context, causal_bias))

    def read_memory(self, x: torch.Tensor, memory: torch.Tensor, read_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Memory read and feed-forward sub-layers of tokens x [N, T, D]; ``read_bias`` from :meth:`memory_bias`."""
        if self.config.use_memory_read:
            mem = _dropout(memory, self.config.memory_dropout, self.training)
            x = self._sublayer(x, self.ln_read, lambda h: self.read(h, mem, read_bias))
        return self._sublayer(x, self.ln_mlp, self.mlp)

    def candidates(self, x: torch.Tensor, memory: torch.Tensor, write_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Write candidates [N, M, D]: the slots attend to the layer's output tokens x [N, K, D]."""
        m = self._sublayer(memory, self.ln_write, lambda h: self.write(h, x, write_bias))
        m = self._sublayer(m, self.ln_memory_mlp, self.memory_mlp)
        return self.ln_candidate(m)


class _SegmentPlan(NamedTuple):
    """Where each input step lands in the [N, S, K] grid of segments (see ``ElmurModel._plan``)."""

    segment_index: torch.Tensor  # [N, T] segment of each step
    offset: torch.Tensor  # [N, T] position of each step inside its segment (its step % K)
    steps: torch.Tensor  # [N, T] episode step of each input step
    segment_start_step: torch.Tensor  # [N, S] episode step at position 0 of each segment
    reset: torch.Tensor  # [N, S] memory resets before the segment (episode start)
    complete: torch.Tensor  # [N, S] segment holds its last position: commit the memory write
    keep_prefix: torch.Tensor  # [N] the first segment continues the state's incomplete segment

    def grid_index(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where every input step [N, T] lies in the grid of segments: its (row, segment, position) indices."""
        n, t = self.offset.shape
        return torch.arange(n, device=self.offset.device).unsqueeze(1).expand(n, t), self.segment_index, self.offset


class ElmurModel(nn.Module):
    """ELMUR backbone: embeds inputs into tokens and runs them through memory layers.

    :param input_dim: size of each step's input vector
    :param config: model hyper-parameters
    """

    def __init__(self, input_dim: int, config: Optional[ElmurConfig] = None) -> None:
        super().__init__()
        self.input_dim = input_dim = check_int("input_dim", input_dim)
        self.config = config = config if config is not None else ElmurConfig()
        # A huge size (memory_size=10**8, d_model=2**20, context_length=10**7) would otherwise end in an
        # out-of-memory kill or a bare allocator error, with no word of which argument asked for it.
        config.check_memory(input_dim)
        self.embed = nn.Linear(input_dim, config.d_model)
        self.layers = nn.ModuleList(ElmurLayer(config) for _ in range(config.n_layers))
        self.ln_out = nn.LayerNorm(config.d_model) if config.norm == "pre" else nn.Identity()
        self.apply(self._init_weights)
        init = torch.randn(config.n_layers, config.memory_size, config.d_model) * config.memory_init_std
        self.register_buffer("memory_init", init)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small weights (as in GPT-2) keep attention near-uniform and residual branches small at the start.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)

    def initial_state(self, batch_size: int, device: Optional[torch.device] = None) -> ElmurState:
        """State at the start of an episode, for ``batch_size`` independent rows."""
        cfg = self.config
        device = device if device is not None else self.memory_init.device
        return ElmurState(
            memory=self.memory_init.to(device).unsqueeze(0).expand(batch_size, -1, -1, -1).clone(),
            positions=torch.full((batch_size, cfg.n_layers, cfg.memory_size), -1, dtype=torch.long, device=device),
            segment=torch.zeros(batch_size, cfg.context_length - 1, cfg.d_model, device=device),
            step=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def _plan(self, step: torch.Tensor, episode_starts: torch.Tensor) -> _SegmentPlan:
        """Cut every row's steps into segments counted from its episode start, resets and all."""
        k = self.config.context_length
        n, t = episode_starts.shape
        time = torch.arange(t, device=step.device).expand(n, t)
        last_start = torch.where(episode_starts, time, torch.full_like(time, -1)).cummax(dim=1).values
        steps = torch.where(last_start >= 0, time - last_start, step.unsqueeze(1) + time)
        offset = steps % k
        begins = episode_starts | (offset == 0)
        begins[:, 0] = True
        segment_index = begins.long().cumsum(dim=1) - 1
        n_segments = int(segment_index.max()) + 1
        segment_start_step = torch.zeros(n, n_segments, dtype=torch.long, device=step.device)
        segment_start_step.scatter_(1, segment_index, steps - offset)  # equal for all steps of a segment
        # scatter_add, not scatter_: several steps share a segment and any one of them may carry the flag.
        flags = torch.zeros(n, n_segments, dtype=torch.long, device=step.device)
        reset = flags.scatter_add(1, segment_index, episode_starts.long()) > 0
        complete = flags.scatter_add(1, segment_index, (offset == k - 1).long()) > 0
        return _SegmentPlan(segment_index, offset, steps, segment_start_step, reset, complete, ~episode_starts[:, 0])

    def forward(
        self, x: torch.Tensor, state: ElmurState, episode_starts: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, ElmurState]:
        """Process T steps of N rows, segment-parallel.

        :param x: [N, T, input_dim] inputs
        :param state: state before the first step (from :meth:`initial_state` or a previous call)
        :param episode_starts: [N, T] bool, True where a new episode begins (resets that row's memory)
        :return: outputs [N, T, d_model] and the state after the last step
        """
        if x.dim() != 3 or x.shape[-1] != self.input_dim:
            raise ValueError(f"expected inputs of shape [batch, time, {self.input_dim}], got {tuple(x.shape)}")
        n, t, _ = x.shape
        if state.step.shape != (n,):
            raise ValueError(f"state is for batch size {state.step.shape[0]}, inputs for {n}")
        if episode_starts is None:
            episode_starts = torch.zeros(n, t, dtype=torch.bool, device=x.device)
        episode_starts = episode_starts.to(device=x.device, dtype=torch.bool)
        if episode_starts.shape != (n, t):
            raise ValueError(f"episode_starts must have shape {(n, t)}, got {tuple(episode_starts.shape)}")
        if t == 1:
            out, state, _ = self.step(x[:, 0], state, episode_starts[:, 0], return_outputs=False)
            return out.unsqueeze(1), state
        k, d = self.config.context_length, self.config.d_model
        plan = self._plan(state.step, episode_starts)
        n_segments = plan.reset.shape[1]

        # Lay the tokens out as [N, S, K, D]; the state's incomplete segment fills the first positions.
        grid = torch.zeros(n, n_segments, k, d, dtype=x.dtype, device=x.device)
        prefix = state.segment * plan.keep_prefix.view(n, 1, 1).to(x.dtype)
        grid[:, 0, : k - 1] = prefix
        index = plan.grid_index()
        grid = grid.index_put(index, self.embed(x))
        position = torch.arange(k, device=x.device)

        h, memory, positions = self._run_segments(grid, plan.segment_start_step.unsqueeze(-1) + position, state,
                                                  plan.reset, plan.complete)
        out = self.ln_out(h)[index]  # from [N, S, K, D]

        # The last segment, if incomplete, becomes the state's prefix.
        last_step = plan.steps[:, -1]
        n_valid = (last_step + 1) % k
        segment = grid[torch.arange(n, device=x.device), plan.segment_index[:, -1], : k - 1]
        segment = segment * (position[: k - 1] < n_valid.unsqueeze(1)).unsqueeze(-1).to(x.dtype)
        return out, ElmurState(memory, positions, segment, last_step + 1)

    def _run_segments(
        self, grid: torch.Tensor, token_steps: torch.Tensor, state: ElmurState, reset: torch.Tensor, complete: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run segments [N, S, K, D] at steps [N, S, K] through every layer, from ``state``'s memory; ``reset`` and
        ``complete`` [N, S] as in :class:`_SegmentPlan`. :return: output tokens, memory and positions after them."""
        n, n_segments, k, d = grid.shape
        resets = [r if any_reset else None for r, any_reset in zip(reset.unbind(1), reset.any(0).tolist())]
        completes = [c if any_complete else None for c, any_complete in zip(complete.unbind(1), complete.any(0).tolist())]
        # Slot positions and LRU choices depend on the plan only, never on memory content: schedule them for every
        # segment first, so that each layer looks its distance biases up once for all segments.
        read_positions, write_weights, positions = [], [], state.positions
        for s in range(n_segments):
            before, weights, positions = self._slot_schedule(positions, token_steps[:, s], resets[s], completes[s])
            read_positions.append(before)
            write_weights.append(weights)
        read_positions = torch.stack(read_positions, dim=1)  # [N, S, L, M]
        flat_steps = token_steps.view(n * n_segments, k)
        any_write = any(weights is not None for weights in write_weights)

        # Layer-major: a layer's self-attention needs no memory, so it runs on all segments in one batched call;
        # only the memory read, feed-forward and write go segment by segment (with the schedule above: training
        # passes 1.37-1.52x faster, benchmarks/results/training_speed.md).
        h = grid
        new_memory = []
        for i, layer in enumerate(self.layers):
            h = layer.self_attend(h.view(n * n_segments, k, d)).view(n, n_segments, k, d)
            layer_positions = read_positions[:, :, i].reshape(n * n_segments, -1)
            read_biases = _per_segment(layer.memory_bias(flat_steps, layer_positions, slots_query=False), n_segments)
            write_biases = _per_segment(layer.memory_bias(flat_steps, layer_positions, slots_query=True)
                                        if any_write else None, n_segments)
            memory = state.memory[:, i]
            segment_outputs = []
            for s in range(n_segments):
                memory = self._restart(memory, resets[s], self.memory_init[i])
                out = layer.read_memory(h[:, s], memory, read_biases[s])
                if write_weights[s] is not None:
                    memory = _blend(memory, layer.candidates(out, memory, write_biases[s]), write_weights[s][:, i])
                segment_outputs.append(out)
            h = torch.stack(segment_outputs, dim=1)
            new_memory.append(memory)
        return h, torch.stack(new_memory, dim=1), positions

    def step(
        self,
        x: torch.Tensor,
        state: ElmurState,
        episode_starts: torch.Tensor,
        outputs: Optional[torch.Tensor] = None,
        return_outputs: bool = True,
    ) -> Tuple[torch.Tensor, ElmurState, Optional[torch.Tensor]]:
        """One step of N rows (acting), same result as the segment-parallel path with less bookkeeping.

        Memory is frozen inside a segment, so the outputs of every layer at the segment's earlier positions do
        not change: with them (``outputs``, returned by the previous call for this very state) every layer
        computes only the new token, also when a segment completes and its memory write needs all of them.

        :param x: [N, input_dim] inputs; :param state: state before the step
        :param episode_starts: [N] bool, True where a new episode begins
        :param outputs: [N, L, K, D] layer outputs of the state's current segment (as returned with ``state``),
            or None to compute them from the state (then the last layer computes only the new token)
        :param return_outputs: return the layer outputs for the next call (else None)
        :return: output [N, d_model], state after the step, layer outputs of its segment
        """
        n = x.shape[0]
        if x.shape != (n, self.input_dim) or state.step.shape != (n,) or episode_starts.shape != (n,):
            raise ValueError(
                f"expected inputs [batch, {self.input_dim}] and a state and episode starts for that batch, got "
                f"{tuple(x.shape)}, {tuple(state.step.shape)} and {tuple(episode_starts.shape)}"
            )
        return self.step_core(x, state, *self.step_branches(state, episode_starts), outputs, return_outputs)

    def step_branches(
        self, state: ElmurState, episode_starts: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The data-dependent part of :meth:`step`, which picks its code path (eager, on tensor values).

        Most steps start no episode and complete no segment: testing that once skips the masking they need.

        :return: step [N] and position in the segment [N] of the new token; the rows that start an episode
            and the rows that complete their segment ([N] bool), each None if there are none
        """
        episode_starts = episode_starts.to(dtype=torch.bool)
        reset = episode_starts if bool(episode_starts.any()) else None
        step = state.step if reset is None else state.step.masked_fill(reset, 0)
        offset = step % self.config.context_length
        complete = offset == self.config.context_length - 1
        return step, offset, reset, complete if bool(complete.any()) else None

    def step_core(
        self,
        x: torch.Tensor,
        state: ElmurState,
        step: torch.Tensor,
        offset: torch.Tensor,
        reset: Optional[torch.Tensor],
        complete: Optional[torch.Tensor],
        outputs: Optional[torch.Tensor] = None,
        return_outputs: bool = True,
    ) -> Tuple[torch.Tensor, ElmurState, Optional[torch.Tensor]]:
        """:meth:`step` given :meth:`step_branches`: no data-dependent control flow, so ``torch.compile`` traces
        it whole (one graph per combination of None / tensor ``reset`` and ``complete``)."""
        n, k, d = x.shape[0], self.config.context_length, self.config.d_model
        segment = state.segment if reset is None else state.segment.masked_fill(reset.view(n, 1, 1), 0.0)
        # The state's segment holds the valid tokens before ``offset`` and zeros after: put the new token at ``offset``.
        tokens = torch.cat([segment, x.new_zeros(n, 1, d)], dim=1)
        tokens = tokens.scatter(1, offset.view(n, 1, 1).expand(n, 1, d), self.embed(x).unsqueeze(1))
        token_steps = (step - offset).unsqueeze(1) + torch.arange(k, device=x.device)
        out, memory, positions, outputs = self._segment(
            tokens, token_steps, state.memory, state.positions, reset, complete, offset, outputs, return_outputs
        )
        if out.shape[1] == k:  # computed at every position
            out = out[torch.arange(n, device=x.device), offset]
        else:
            out = out[:, 0]
        if complete is not None:  # the next segment starts empty
            tokens = tokens.masked_fill(complete.view(n, 1, 1), 0.0)
        segment = tokens[:, : k - 1]  # a view either way: the same strides for the next step's compiled graph
        return self.ln_out(out), ElmurState(memory, positions, segment, step + 1), outputs

    def _segment(
        self,
        tokens: torch.Tensor,
        token_steps: torch.Tensor,
        memory: torch.Tensor,
        positions: torch.Tensor,
        reset: Optional[torch.Tensor],
        complete: Optional[torch.Tensor],
        query_offsets: Optional[torch.Tensor] = None,
        outputs: Optional[torch.Tensor] = None,
        return_outputs: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Run one segment through every layer and commit the memory writes of the rows that complete it.

        :param tokens: [N, K, D] input tokens; :param token_steps: [N, K] their episode steps
        :param memory: [N, L, M, D] memory before the segment; :param positions: [N, L, M] its slot positions
        :param reset: [N] the episode starts in this segment: memory restarts from its initial content
            (None: no row resets)
        :param complete: [N] the segment holds its last position: write to memory (None: no row completes)
        :param query_offsets: [N] acting: the one position per row whose output is needed
        :param outputs: [N, L, K, D] acting: every layer's outputs at the positions before ``query_offsets``;
            each layer then computes the ``query_offsets`` position only
        :param return_outputs: also return every layer's outputs [N, L, K, D]
        :return: output tokens [N, K, D], or [N, 1, D] at ``query_offsets`` when only those were computed;
            memory and positions after the segment; every layer's outputs (None unless ``return_outputs``)
        """
        n, k, d = tokens.shape
        memory = self._restart(memory, reset, self.memory_init)
        positions, write_weights, written_positions = self._slot_schedule(positions, token_steps, reset, complete)
        # Without cached outputs, the positions before ``query_offsets`` are recomputed where a later layer, the
        # write or the caller needs them; the last layer computes only the queried one if none of them does.
        full_last = query_offsets is None or write_weights is not None or return_outputs
        written_memory, layer_outputs = [], []
        h = tokens
        for i, layer in enumerate(self.layers):
            mem, pos = memory[:, i], positions[:, i]
            if outputs is not None:
                out = layer(h, token_steps, mem, pos, query_offsets)
                h = outputs[:, i].scatter(1, query_offsets.view(n, 1, 1).expand(n, 1, d), out)
            else:
                last = i == len(self.layers) - 1
                h = out = layer(h, token_steps, mem, pos, None if full_last or not last else query_offsets)
            layer_outputs.append(h)
            if write_weights is not None:
                candidates = layer.candidates(h, mem, layer.memory_bias(token_steps, pos, slots_query=True))
                written_memory.append(_blend(mem, candidates, write_weights[:, i]))
        if write_weights is not None:
            memory = torch.stack(written_memory, dim=1)
        return out, memory, written_positions, torch.stack(layer_outputs, dim=1) if return_outputs else None

    def _restart(self, memory: torch.Tensor, reset: Optional[torch.Tensor], initial: torch.Tensor) -> torch.Tensor:
        """Memory [N, ...] from its ``initial`` content where ``reset`` [N] (None: nowhere), detached between
        segments if the config says so."""
        if reset is not None:
            memory = torch.where(reset.view(-1, *[1] * (memory.dim() - 1)), initial.to(memory.dtype), memory)
        return memory.detach() if self.config.detach_memory else memory

    def _slot_schedule(
        self,
        positions: torch.Tensor,
        token_steps: torch.Tensor,
        reset: Optional[torch.Tensor],
        complete: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Slot positions [N, L, M] around one segment (token steps [N, K]) that ``reset`` / ``complete`` [N] rows.

        :return: the positions the segment reads, the LRU blend weights [N, L, M] of its write (None: no write)
            and the positions after it
        """
        if reset is not None:
            positions = positions.masked_fill(reset.view(-1, 1, 1), -1)
        if complete is None or not self.config.use_memory_write:
            return positions, None, positions
        cfg = self.config
        weights, written = lru_weights(positions, token_steps[:, -1], cfg.alpha, cfg.empty_slot_write == "hard", complete)
        return positions, weights, written


def _per_segment(bias: Optional[torch.Tensor], n_segments: int) -> List[Optional[torch.Tensor]]:
    """A bias [N * S, ...] computed for all segments at once, as one [N, ...] per segment (all None for None)."""
    if bias is None:
        return [None] * n_segments
    return list(bias.view(-1, n_segments, *bias.shape[1:]).unbind(1))
