"""Hyper-parameters of the ELMUR model (:class:`ElmurConfig`), checked when built."""

from dataclasses import dataclass
from typing import List, Optional, Tuple

from sb3_elmur.common.checks import check_bool, check_float, check_int, check_memory, format_bytes

DISTANCE_BIAS_MODES = ("clamped", "log")
EMPTY_SLOT_WRITE_MODES = ("hard", "blend")
NORM_MODES = ("pre", "post")
CROSS_SEGMENT_MODES = ("off", "previous", "window")


@dataclass
class ElmurConfig:
    """Hyper-parameters of :class:`ElmurModel`.

    :param d_model: token and memory width D
    :param n_layers: number of transformer layers L (each owns its memory). The defaults (D 32, one layer; until
        2026-12-06: 64 and 2) learned more online at a fraction of the cost: with ElmurPPO on noisy recall at delay 60
        (150k env steps, 5 seeds) 0.97 +- 0.02 greedy success against 0.92 +- 0.03,
        and only they solved the passive T-Maze at corridor 100 with 64-step rollouts
        (``benchmarks/results/online_memory_diagnosis.md``). Widen or deepen them for rich observations
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
    :param read_init_std: std of the initial weights of the memory read's value and output projections (every other
        weight: 0.02, GPT-2's). At 0.02 the read adds little to a token, so what memory holds barely shows in its
        output before training: on noisy recall at delay 60, a linear probe read the cue from the memory at the
        query at 0.98-1.00, from the policy's latent there at 0.47-0.51 (chance 0.33, 3 seeds); at 0.1 at
        0.84-0.90. An extension beyond the paper (the reference code: 0.02 everywhere); the figures, online
        training included, are in ``benchmarks/results/memory_probe.md``
    :param cross_segment_attention: "off" (the paper: a token attends to its own segment only, and sees earlier
        steps through memory), "previous" (Transformer-XL's recurrence: each layer's self-attention also attends to
        its inputs over the whole previous segment) or "window" (a sliding window: each token attends to the last
        ``context_length`` steps, across the segment boundary). Memory reads and writes stay per segment. With it on,
        the state carries every layer's inputs over the previous segment (``n_layers * context_length * d_model``
        floats more per env). An extension beyond the paper; the measurements: ``docs/model.md``
    :param reservoir_layers: layers beside the trained ones that keep their random initial weights (a reservoir, as in
        echo state networks): they read the same embedded tokens, each owns a memory like any layer, and the model's
        output is the trained layers' output and the reservoir's side by side (``2 * d_model`` wide). The embedding
        is fixed too, so the reservoir's input never drifts: what its memory returns stays in the output however
        training changes the other layers, which wash a cue held far back out of their output (an extension beyond
        the paper, opt-in; the measurements: ``docs/model.md``). 0 (default): none
    """

    d_model: int = 32
    n_layers: int = 1
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
    read_init_std: float = 0.1
    cross_segment_attention: str = "off"
    reservoir_layers: int = 0

    def __post_init__(self) -> None:
        if self.max_distance is None:
            self.max_distance = 2**24 if self.distance_bias == "log" else 1023
        # Store plain Python types: numpy scalars would be saved as such and compare oddly later.
        for name in ("d_model", "n_layers", "n_heads", "memory_size", "context_length", "mlp_ratio", "max_distance"):
            setattr(self, name, check_int(f"ElmurConfig.{name}", getattr(self, name)))
        self.distance_buckets = check_int("ElmurConfig.distance_buckets", self.distance_buckets)
        self.reservoir_layers = check_int("ElmurConfig.reservoir_layers", self.reservoir_layers, minimum=0)
        for name in ("alpha", "memory_init_std", "dropout", "attn_dropout", "memory_dropout", "read_init_std"):
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
            ("cross_segment_attention", CROSS_SEGMENT_MODES),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"ElmurConfig.{name} must be one of {allowed}, got {value!r}")
            setattr(self, name, str(value))
        for name in ("dropout", "attn_dropout", "memory_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ElmurConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("memory_init_std", "read_init_std"):
            if not getattr(self, name) >= 0.0:  # NaN fails too
                raise ValueError(f"ElmurConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.distance_bias == "log" and not 8 <= self.distance_buckets <= self.max_distance:
            raise ValueError(
                f"ElmurConfig.distance_buckets must be in [8, max_distance], got {self.distance_buckets!r}"
            )

    @property
    def previous_length(self) -> int:
        """Steps of the previous segment that a token's self-attention sees keys of: 0 ("off"), else K."""
        return 0 if self.cross_segment_attention == "off" else self.context_length

    @property
    def memory_layers(self) -> int:
        """Layers that own a memory (and a row of the state): the trained ones and the reservoir's."""
        return self.n_layers + self.reservoir_layers

    @property
    def output_dim(self) -> int:
        """Width of the model's output per step: ``d_model``, twice that with a reservoir."""
        return 2 * self.d_model if self.reservoir_layers else self.d_model

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
        n, m = self.memory_layers, self.memory_size
        # Per layer: four attentions (q, kv, proj: 4 D^2 + 4 D each), two MLPs, layer norms; float32.
        weights = n * (4 * (4 * d * d + 4 * d) + 2 * (2 * r * d * d + r * d + d) + 12 * d) * 4
        # Per layer: the relative bias and the [K, Kp + K] offsets (int64) and causal mask (float32).
        kp = self.previous_length
        segment = n * (h * (k + kp) * 4 + k * (k + kp) * 12)
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

    def state_fields(self) -> List[Tuple[str, int, int]]:
        """One row of :class:`ElmurState`, field by field, in the order the packed state lays them out:
        (name, number of elements, bytes per element as the state holds it)."""
        n, m, d = self.memory_layers, self.memory_size, self.d_model
        return [
            ("step", 1, 8),
            ("positions", n * m, 8),
            ("memory", n * m * d, 4),
            ("segment", (self.context_length - 1) * d, 4),
            ("previous", n * self.previous_length * d, 4),
        ]

    def state_bytes(self) -> int:
        """Bytes of one row of :class:`ElmurState` (memory, slot positions, segment tokens, step, previous segment)."""
        return sum(count * size for _, count, size in self.state_fields())

    def describe(self) -> str:
        """The size fields (all that set the state's layout), for messages."""
        reservoir = f", reservoir_layers={self.reservoir_layers}" if self.reservoir_layers else ""
        cross = f", cross_segment_attention={self.cross_segment_attention!r}" if self.previous_length else ""
        return (f"ElmurConfig(d_model={self.d_model}, n_layers={self.n_layers}{reservoir}, memory_size={self.memory_size}, "
                f"context_length={self.context_length}{cross})")

    def check_memory(self, input_dim: int = 0, n_states: int = 0, copies: int = 1, what: str = "ElmurModel") -> None:
        """Refuse a config whose model (and states) cannot fit in RAM, naming the argument that asks the most.

        :param input_dim: size of each step's input vector
        :param n_states: rows of :class:`ElmurState` to count besides the model
        :param copies: copies of the trained layers' weights to count (e.g. 4 for training: parameters, gradients and
            Adam's two moments)
        :param what: who allocates, for the message
        :raises InsufficientMemoryError: it does not fit
        """
        parts = self.model_bytes(input_dim)
        weights = next(size for size, name in parts if name.startswith("d_model="))
        trained = weights * self.n_layers // self.memory_layers  # a reservoir's fixed weights have one copy only
        state = n_states * self.state_bytes()
        total = sum(size for size, _ in parts) + (copies - 1) * trained + state
        largest = parts[0][1]
        if state > parts[0][0]:
            largest = (f"memory_size={self.memory_size} and context_length={self.context_length}: {n_states} "
                       f"recurrent state(s) of {format_bytes(self.state_bytes())} each")
        check_memory(total, f"{what} with {self.describe()} (mostly {largest})",
                     f"reduce {largest.split('=')[0]}")

