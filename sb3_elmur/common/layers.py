"""The layers of ELMUR: attention with learned distance biases, and the memory layer (read, write)."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sb3_elmur.common.config import ElmurConfig


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


class Attention(nn.Module):
    """Multi-head attention whose scores take an additive bias (position, distance and causal masks)."""

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
        if queries.is_cuda or not torch.is_grad_enabled():
            # One fused kernel for the scores, softmax and weighted sum: on CPU (torch 2.13) 3-4x faster than the
            # explicit form for an acting step's single query (measured), and 1 operator call instead of about 12.
            p = self.attn_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=scale)
        else:
            # Training on CPU: the biases are learned, and with a gradient for its mask the fused kernel falls back
            # to a composite that was 6-8% slower than this form in forward and backward (measured). For one or
            # two queries (memory writes at M <= 2), broadcast products beat bmm over N * H tiny matrices.
            few = tq <= 2
            scores = ((q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) if few else q @ k.transpose(-1, -2)) * scale
            if bias is not None:
                scores = scores + bias
            weights = _dropout(torch.softmax(scores, dim=-1), self.attn_dropout, self.training)
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
    """One layer: causal self-attention, memory read, feed-forward; and the write candidate for its memory.

    ``ElmurModel._run_segments`` calls the sub-layers in turn (:meth:`self_attend`, :meth:`read_memory`,
    :meth:`candidates`), for whole segments in training and for one new token in acting."""

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
        # Keys of the self-attention: the previous segment's Kp steps (config.previous_length: 0, the spec, or K with
        # cross-segment attention), then the segment's K. Query i and key j lie i + Kp - j steps apart.
        kp = config.previous_length
        distance = torch.arange(k).view(k, 1) + kp - torch.arange(kp + k).view(1, kp + k)
        seen = distance >= 0  # causal
        if config.cross_segment_attention == "window":
            seen &= distance < k  # the last K steps, the query's own included
        # Relative position bias (depends on the distance only), one entry per distance a query can see.
        self.relative_bias = nn.Parameter(torch.zeros(config.n_heads, int(distance[seen].max()) + 1))
        self.register_buffer("offsets", distance.clamp(min=0, max=self.relative_bias.shape[1] - 1), persistent=False)
        # Additive causal mask (0 or -inf): one add per call instead of inverting and filling a bool mask.
        self.register_buffer("causal_mask", torch.zeros(k, kp + k).masked_fill(~seen, float("-inf")), persistent=False)

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

    def self_attend(
        self,
        x: torch.Tensor,
        previous: Optional[torch.Tensor] = None,
        previous_mask: Optional[torch.Tensor] = None,
        query_offsets: Optional[torch.Tensor] = None,
        query: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Causal self-attention sub-layer over segments x [N, K, D] (at ``query_offsets`` [N] only: [N, 1, D]).

        :param previous: with cross-segment attention, this layer's inputs over each segment's previous segment
            [N, K, D], keys before the segment's own
        :param previous_mask: [N, 1, 1, 2K] additive mask (0 or -inf) of those keys: -inf where the previous segment
            is not of the episode
        :param query: with ``query_offsets``, the tokens [N, 1, D] of x there (acting: the new token, which the
            caller holds, so that no gather looks it up)
        """
        causal_bias = self.relative_bias[:, self.offsets] + self.causal_mask  # [H, K, Kp + K]
        if query_offsets is None and previous is None:
            return self._sublayer(x, self.ln_self_attn, lambda h: self.self_attn(h, h, causal_bias.unsqueeze(0)))
        keys = x if previous is None else torch.cat([previous, x], dim=1)
        context = self.ln_self_attn(keys) if self.config.norm == "pre" else keys
        if query_offsets is None:
            causal_bias = causal_bias.unsqueeze(0)
        else:
            causal_bias = causal_bias[:, query_offsets].transpose(0, 1).unsqueeze(2)  # [N, H, 1, Kp + K]
            x = query
        if previous_mask is not None:
            causal_bias = causal_bias + previous_mask
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

