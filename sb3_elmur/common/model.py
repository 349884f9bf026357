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

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from sb3_elmur.common.checks import check_int
from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.host_sync import is_accelerated
from sb3_elmur.common.layers import ElmurLayer
from sb3_elmur.common.memory import ElmurState, _blend, lru_weights


# Weights start at this std (GPT-2's), except the memory read's (ElmurConfig.read_init_std).
INIT_STD = 0.02


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
        # The trained layers, then the reservoir's (config.reservoir_layers): layer i owns row i of the state's memory.
        self.layers = nn.ModuleList(ElmurLayer(config) for _ in range(config.memory_layers))
        self.ln_out = nn.LayerNorm(config.d_model) if config.norm == "pre" else nn.Identity()
        self.ln_reservoir_out = None
        if config.reservoir_layers:
            self.ln_reservoir_out = nn.LayerNorm(config.d_model) if config.norm == "pre" else nn.Identity()
        self.apply(self._init_weights)
        with torch.no_grad():  # the memory read's value and output projections at config.read_init_std
            for layer in self.layers:
                layer.read.key_value.weight[config.d_model:].mul_(config.read_init_std / INIT_STD)
                layer.read.proj.weight.mul_(config.read_init_std / INIT_STD)
        init = torch.randn(config.memory_layers, config.memory_size, config.d_model) * config.memory_init_std
        self.register_buffer("memory_init", init)
        if config.reservoir_layers:
            # Fixed weights are buffers, not parameters: no optimizer, freezing or unfreezing ever reaches them.
            for module in (self.embed, self.ln_reservoir_out, *self.layers[config.n_layers:]):
                _fix_weights(module)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small weights (as in GPT-2) keep attention near-uniform and residual branches small at the start.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            nn.init.zeros_(module.bias)

    def initial_state(self, batch_size: int, device: Optional[torch.device] = None) -> ElmurState:
        """State at the start of an episode, for ``batch_size`` independent rows."""
        cfg = self.config
        device = device if device is not None else self.memory_init.device
        return ElmurState(
            memory=self.memory_init.to(device).unsqueeze(0).expand(batch_size, -1, -1, -1).clone(),
            positions=torch.full((batch_size, cfg.memory_layers, cfg.memory_size), -1, dtype=torch.long, device=device),
            segment=torch.zeros(batch_size, cfg.context_length - 1, cfg.d_model, device=device),
            step=torch.zeros(batch_size, dtype=torch.long, device=device),
            previous=torch.zeros(batch_size, cfg.memory_layers, cfg.previous_length, cfg.d_model, device=device),
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
        :return: outputs [N, T, output_dim] and the state after the last step
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

        # Which segments reset or write, as None where no row does: most do neither, and skip the masking.
        resets = [r if any_reset else None for r, any_reset in zip(plan.reset.unbind(1), plan.reset.any(0).tolist())]
        completes = [c if any_complete else None
                     for c, any_complete in zip(plan.complete.unbind(1), plan.complete.any(0).tolist())]
        token_steps = plan.segment_start_step.unsqueeze(-1) + position
        h, memory, positions, _, inputs, reservoir = self._run_segments(
            grid, token_steps, state.memory, state.positions, resets, completes, state.previous
        )
        out = self._output(h, reservoir)[index]  # from [N, S, K, D]
        previous = self._last_complete_inputs(plan, state.previous, inputs) if self.config.previous_length else state.previous

        # The last segment, if incomplete, becomes the state's prefix.
        last_step = plan.steps[:, -1]
        n_valid = (last_step + 1) % k
        segment = grid[torch.arange(n, device=x.device), plan.segment_index[:, -1], : k - 1]
        segment = segment * (position[: k - 1] < n_valid.unsqueeze(1)).unsqueeze(-1).to(x.dtype)
        return out, ElmurState(memory, positions, segment, last_step + 1, previous)

    def _output(self, tokens: torch.Tensor, reservoir: Optional[torch.Tensor]) -> torch.Tensor:
        """The model's output from the last trained layer's tokens [..., D] and the last reservoir layer's."""
        out = self.ln_out(tokens)
        return out if reservoir is None else torch.cat([out, self.ln_reservoir_out(reservoir)], dim=-1)

    def _last_complete_inputs(self, plan: _SegmentPlan, previous: torch.Tensor, inputs: List[torch.Tensor]) -> torch.Tensor:
        """Every layer's inputs [N, L, K, D] over each row's last complete segment of its episode (zeros if none):
        the final segment if complete, else the one before it (the state's ``previous`` if that came before the
        call), else zeros (the episode has completed no segment)."""
        n, k = previous.shape[0], self.config.context_length
        rows = torch.arange(n, device=previous.device)
        final = plan.segment_index[:, -1]
        complete = plan.complete[rows, final]
        keep = (complete | (plan.segment_start_step[rows, final] >= k)).view(n, 1, 1)
        picked = [torch.cat([previous[:, i].unsqueeze(1), layer_inputs], dim=1)[rows, final + complete.long()]
                  for i, layer_inputs in enumerate(inputs)]  # segment s of the inputs is s + 1 after the cat
        return torch.stack([torch.where(keep, x, 0.0) for x in picked], dim=1)

    def _run_segments(
        self,
        grid: torch.Tensor,
        token_steps: torch.Tensor,
        memory: torch.Tensor,
        positions: torch.Tensor,
        resets: List[Optional[torch.Tensor]],
        completes: List[Optional[torch.Tensor]],
        previous: torch.Tensor,
        query_offsets: Optional[torch.Tensor] = None,
        query_index: Optional[torch.Tensor] = None,
        outputs: Optional[torch.Tensor] = None,
        query: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor], Optional[torch.Tensor]]:
        """The layer stack, for training and acting alike: segments [N, S, K, D] at episode steps [N, S, K] through
        every layer, from ``memory`` [N, L, M, D] and its slot ``positions`` [N, L, M].

        :param resets: per segment, the rows whose episode starts in it ([N] bool), or None where no row's does
        :param completes: per segment, the rows that hold its last position and write to memory, or None
        :param previous: [N, L, Kp, D] every layer's inputs over the segment before the first (cross-segment
            attention; Kp = 0 without it)
        :param query_offsets: acting, one segment (S = 1): the position [N] of each row's new token; with
            ``outputs``, every layer computes that position only and splices it into its cached outputs
        :param query_index: the same positions as a scatter index [N, 1, D] (the caller's, built once per step)
        :param outputs: [N, L, K, D] every layer's outputs at the segment's earlier positions (the cache that
            the previous step returned), or None to compute every position
        :param query: with ``outputs``, the new token's embedding [N, 1, D] (each layer then passes its output at the
            new token to the next, with no lookup in the segment)
        :return: the last layer's outputs [N, S, K, D] (with ``outputs``: at the new token only, [N, 1, 1, D]),
            memory and positions after the segments, (S = 1) every layer's outputs [N, L, K, D], the cache of the
            next step, every layer's inputs [N, S, K, D], and the last reservoir layer's outputs (shaped as the last
            layer's; None without a reservoir). L counts the reservoir's layers, after the trained ones.
        """
        n, n_segments, k, d = grid.shape
        # Slot positions and LRU choices depend on the plan only, never on memory content: schedule them for every
        # segment first, so that each layer looks its distance biases up once for all segments.
        read_positions, write_weights = [], []
        for s in range(n_segments):
            before, weights, positions = self._slot_schedule(positions, token_steps[:, s], resets[s], completes[s])
            read_positions.append(before)
            write_weights.append(weights)
        read_positions = torch.stack(read_positions, dim=1)  # [N, S, L, M]
        flat_steps = token_steps.view(n * n_segments, k)
        query_steps = None if outputs is None else flat_steps.gather(1, query_offsets.view(n, 1))  # [N, 1]
        any_write = any(weights is not None for weights in write_weights)
        kp, previous_mask = self.config.previous_length, None
        if kp:
            # A segment's previous one is of its episode if the segment starts at episode step K or later.
            has_previous = (token_steps[:, :, :1] >= k).view(n * n_segments, 1, 1, 1)
            own_keys = torch.arange(kp + k, device=grid.device) >= kp
            previous_mask = torch.where(has_previous | own_keys, 0.0, float("-inf")).to(grid.dtype)

        # Layer-major: a layer's self-attention needs no memory, so it runs on all segments in one batched call;
        # only the memory read, feed-forward and write go segment by segment (with the schedule above: training
        # passes 1.37-1.52x faster, benchmarks/results/training_speed.md).
        h, new_memory, layer_outputs, inputs, trained = grid, [], [], [], None
        embedded, last_layers = query, (self.config.n_layers - 1, len(self.layers) - 1)
        for i, layer in enumerate(self.layers):
            if i == self.config.n_layers:  # the reservoir: from the embedded tokens again, with no gradient
                trained, h, query = h, grid.detach(), embedded
            inputs.append(h)
            layer_positions = read_positions[:, :, i].reshape(n * n_segments, -1)
            if outputs is None:
                layer_previous = None
                if kp:  # cross-segment attention: segment s also attends to this layer's inputs over segment s - 1
                    layer_previous = torch.cat([previous[:, i].unsqueeze(1), h[:, :-1]], dim=1).view(-1, k, d)
                x = layer.self_attend(h.view(n * n_segments, k, d), layer_previous, previous_mask)
                x = x.view(n, n_segments, k, d)
                read_bias = layer.memory_bias(flat_steps, layer_positions, slots_query=False)
            else:  # the new token only: [N, 1, 1, D]
                x = layer.self_attend(h[:, 0], previous[:, i] if kp else None, previous_mask, query_offsets, query)
                x = x.unsqueeze(1)
                read_bias = layer.memory_bias(query_steps, layer_positions, slots_query=False)
            read_biases = _per_segment(read_bias, n_segments)
            write_biases = _per_segment(layer.memory_bias(flat_steps, layer_positions, slots_query=True)
                                        if any_write else None, n_segments)
            layer_memory = memory[:, i]
            segment_outputs = []
            for s in range(n_segments):
                layer_memory = self._restart(layer_memory, resets[s], self.memory_init[i])
                out = layer.read_memory(x[:, s], layer_memory, read_biases[s])
                if outputs is not None:  # the new token's output: the next layer's query, spliced into the cache
                    query, out = out, outputs[:, i].scatter(1, query_index, out)
                if write_weights[s] is not None:
                    candidates = layer.candidates(out, layer_memory, write_biases[s])
                    layer_memory = _blend(layer_memory, candidates, write_weights[s][:, i])
                segment_outputs.append(out)
            # Acting with the cache, the last layer's outputs are its new token's (query), so no stack of them.
            h = query.unsqueeze(1) if outputs is not None and i in last_layers else torch.stack(segment_outputs, 1)
            new_memory.append(layer_memory)
            layer_outputs.append(segment_outputs[-1])
        # Most acting steps neither write nor restart a memory: the state keeps its tensor, with no stack of copies.
        unchanged = not any_write and all(reset is None for reset in resets) and not self.config.detach_memory
        h, reservoir = (h, None) if trained is None else (trained, h)
        return (h, memory if unchanged else torch.stack(new_memory, dim=1), positions, torch.stack(layer_outputs, 1),
                inputs, reservoir)

    def step(
        self,
        x: torch.Tensor,
        state: ElmurState,
        episode_starts: torch.Tensor,
        outputs: Optional[torch.Tensor] = None,
        return_outputs: bool = True,
    ) -> Tuple[torch.Tensor, ElmurState, Optional[torch.Tensor]]:
        """One step of N rows (acting): the layer stack of training (:meth:`_run_segments`) on the state's segment.

        Memory is frozen inside a segment, so the outputs of every layer at the segment's earlier positions do
        not change: with them (``outputs``, returned by the previous call for this very state) every layer
        computes only the new token, also when a segment completes and its memory write needs all of them.

        :param x: [N, input_dim] inputs; :param state: state before the step
        :param episode_starts: [N] bool, True where a new episode begins
        :param outputs: [N, L, K, D] layer outputs of the state's current segment (as returned with ``state``),
            or None to compute them from the state
        :param return_outputs: return the layer outputs for the next call (else None)
        :return: output [N, output_dim], state after the step, layer outputs of its segment
        """
        n = x.shape[0]
        if x.shape != (n, self.input_dim) or state.step.shape != (n,) or episode_starts.shape != (n,):
            raise ValueError(
                f"expected inputs [batch, {self.input_dim}] and a state and episode starts for that batch, got "
                f"{tuple(x.shape)}, {tuple(state.step.shape)} and {tuple(episode_starts.shape)}"
            )
        return self.step_core(x, state, *self.step_branches(state, episode_starts), outputs, return_outputs)

    def step_branches(
        self, state: ElmurState, episode_starts: torch.Tensor, always_masks: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The data-dependent part of :meth:`step`, which picks its code path (eager, on tensor values).

        Most steps start no episode and complete no segment: on the CPU, testing that once skips the masking they
        need. On an accelerator the test would make the host wait for the device (``host_sync``), and in an exported
        graph it would freeze the example's answer, so both masks are passed as they are: an all-False mask gives the
        same results.

        :param always_masks: return masks, never None, on any device (export)
        :return: step [N] and position in the segment [N] of the new token; the rows that start an episode
            and the rows that complete their segment ([N] bool), each None (CPU only) if there are none
        """
        if episode_starts.dtype != torch.bool:
            episode_starts = episode_starts.bool()
        masks = always_masks or is_accelerated(episode_starts.device)
        reset = episode_starts if masks or bool(episode_starts.any()) else None
        step = state.step if reset is None else state.step.masked_fill(reset, 0)
        offset = step % self.config.context_length
        complete = offset == self.config.context_length - 1
        return step, offset, reset, complete if masks or bool(complete.any()) else None

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
        token_index, embedded = offset.view(n, 1, 1).expand(n, 1, d), self.embed(x).unsqueeze(1)
        tokens = tokens.scatter(1, token_index, embedded)
        token_steps = (step - offset).unsqueeze(1) + torch.arange(k, device=x.device)
        previous = state.previous
        if reset is not None and self.config.previous_length:
            previous = previous.masked_fill(reset.view(n, 1, 1, 1), 0.0)
        h, memory, positions, layer_outputs, inputs, reservoir = self._run_segments(
            tokens.unsqueeze(1), token_steps.unsqueeze(1), state.memory, state.positions, [reset], [complete],
            previous, offset, token_index, outputs, embedded,
        )
        if self.config.previous_length and complete is not None:  # the completed segment becomes the previous one
            previous = torch.where(complete.view(n, 1, 1, 1), torch.stack([x[:, 0] for x in inputs], dim=1), previous)

        def at_new_token(x: torch.Tensor) -> torch.Tensor:  # [N, 1, 1, D] (with the cache) or [N, 1, K, D]
            return x.view(n, d) if outputs is not None else x[:, 0].gather(1, token_index)[:, 0]

        out = self._output(at_new_token(h), None if reservoir is None else at_new_token(reservoir))
        if complete is not None:  # the next segment starts empty
            tokens = tokens.masked_fill(complete.view(n, 1, 1), 0.0)
        segment = tokens[:, : k - 1]  # a view either way: the same strides for the next step's compiled graph
        next_state = ElmurState(memory, positions, segment, step + 1, previous)
        return out, next_state, layer_outputs if return_outputs else None

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


def _fix_weights(module: nn.Module) -> None:
    """Turn every parameter of ``module`` (and its sub-modules) into a buffer of the same name: kept, saved and moved
    with the model, never trained."""
    for child in module.modules():
        for name, parameter in list(child.named_parameters(recurse=False)):
            delattr(child, name)
            child.register_buffer(name, parameter.detach())


def _per_segment(bias: Optional[torch.Tensor], n_segments: int) -> List[Optional[torch.Tensor]]:
    """A bias [N * S, ...] computed for all segments at once, as one [N, ...] per segment (all None for None)."""
    if bias is None:
        return [None] * n_segments
    if n_segments == 1:
        return [bias]
    return list(bias.view(-1, n_segments, *bias.shape[1:]).unbind(1))
