import math

import numpy as np
import pytest
import torch

from sb3_elmur.common.checks import check_bool, check_int, check_max_grad_norm
from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.layers import Attention
from sb3_elmur.common.memory import ElmurState, lru_write
from sb3_elmur.common.model import ElmurModel

torch.set_num_threads(1)


def _model(input_dim: int = 5, seed: int = 0, **kwargs) -> ElmurModel:
    torch.manual_seed(seed)
    defaults = dict(d_model=16, n_layers=2, n_heads=2, memory_size=3, context_length=4, alpha=0.6, memory_init_std=0.3)
    defaults.update(kwargs)
    model = ElmurModel(input_dim, ElmurConfig(**defaults))
    # Non-zero biases make every positional path matter in the comparisons below.
    with torch.no_grad():
        for layer in model.layers:
            for table in (layer.read_bias.table, layer.write_bias.table, layer.relative_bias):
                table.normal_()
    return model.eval()


def _run_stepwise(model, x, state, starts):
    outputs = []
    for t in range(x.shape[1]):
        out, state = model(x[:, t : t + 1], state, starts[:, t : t + 1])
        outputs.append(out)
    return torch.cat(outputs, dim=1), state


def _assert_states_close(a: ElmurState, b: ElmurState, atol: float = 1e-5) -> None:
    for name, x, y in zip(ElmurState._fields, a, b):
        assert x.shape == y.shape, name
        if x.dtype == torch.long:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"norm": "pre"},
        {"distance_bias": "clamped", "max_distance": 7},
        {"empty_slot_write": "blend", "alpha": 0.3},
        {"context_length": 1, "memory_size": 1},
        {"context_length": 7, "memory_size": 2, "alpha": 1.0},
        {"use_memory_read": False},
        {"use_memory_write": False},
        {"use_distance_bias": False, "n_layers": 1},
        {"detach_memory": True},
        {"reservoir_layers": 1},
        {"reservoir_layers": 2, "n_layers": 1, "norm": "pre"},
    ],
)
def test_stepwise_equals_sequence(kwargs):
    model = _model(**kwargs)
    gen = torch.Generator().manual_seed(1)
    n, t = 6, 37
    # Warm up to a random phase of a segment, with its own episode starts.
    warm_len = 1 + int(torch.randint(0, 13, (1,), generator=gen))
    warm = torch.randn(n, warm_len, 5, generator=gen)
    _, state = model(warm, model.initial_state(n), torch.rand(n, warm_len, generator=gen) < 0.2)
    x = torch.randn(n, t, 5, generator=gen)
    starts = torch.rand(n, t, generator=gen) < 0.08
    starts[0, 5] = starts[1, 0] = True  # a mid-sequence start and one on the first step

    seq_out, seq_state = model(x, state, starts)
    step_out, step_state = _run_stepwise(model, x, state, starts)
    torch.testing.assert_close(seq_out, step_out, atol=1e-5, rtol=0)
    _assert_states_close(seq_state, step_state)

    # Any split into chunks gives the same too.
    out_a, mid = model(x[:, :11], state, starts[:, :11])
    out_b, end = model(x[:, 11:], mid, starts[:, 11:])
    torch.testing.assert_close(torch.cat([out_a, out_b], dim=1), seq_out, atol=1e-5, rtol=0)
    _assert_states_close(end, seq_state)


def test_memory_carries_information_across_segments():
    model = _model(context_length=3, memory_size=2)
    x = torch.randn(2, 30, 5)
    x[1, 1:] = x[0, 1:]  # rows differ only in their first step
    x[1, 0] += 10.0
    out, _ = model(x, model.initial_state(2))
    assert (out[0, -1] - out[1, -1]).abs().max() > 1e-6

    no_memory = _model(context_length=3, memory_size=2, use_memory_read=False)
    out, _ = no_memory(x, no_memory.initial_state(2))
    torch.testing.assert_close(out[0, 3:], out[1, 3:], atol=1e-7, rtol=0)


def test_episode_start_resets_only_its_row():
    model = _model()
    x = torch.randn(3, 20, 5)
    _, state = model(torch.randn(3, 9, 5), model.initial_state(3))
    starts = torch.zeros(3, 20, dtype=torch.bool)
    starts[1, 0] = True
    out, _ = model(x, state, starts)
    ref, _ = model(x, model.initial_state(3))
    torch.testing.assert_close(out[1], ref[1], atol=1e-6, rtol=0)
    assert (out[0] - ref[0]).abs().max() > 1e-4 and (out[2] - ref[2]).abs().max() > 1e-4
    # Rows 0 and 2 are unaffected by row 1's reset.
    untouched, _ = model(x, state)
    torch.testing.assert_close(out[[0, 2]], untouched[[0, 2]], atol=1e-6, rtol=0)


def test_state_after_a_long_episode_holds_only_its_recent_past():
    """A fixed-size state whatever the episode's length, because it holds what the spec says and nothing else:
    after 2,053 steps (segments of 5, 3 slots per layer) every layer's slots were last written at the ends of the 3
    latest completed segments (steps 2039, 2044, 2049), and the partial segment holds the embedded inputs of steps
    2050-2052 at positions 0-2 and nothing after them."""
    model = _model(context_length=5)
    state = model.initial_state(2)
    initial_shapes = [tuple(part.shape) for part in state]
    inputs = [torch.randn(2, length, 5) for length in (3, 50, 2000)]
    with torch.no_grad():
        for x in inputs:
            _, state = model(x, state)
        embedded = model.embed(inputs[-1][:, -3:])
    assert [tuple(part.shape) for part in state] == initial_shapes
    assert state.step.tolist() == [2053, 2053]
    assert (state.positions.sort(dim=-1).values == torch.tensor([2039, 2044, 2049])).all()
    torch.testing.assert_close(state.segment[:, :3], embedded, atol=1e-6, rtol=0)
    assert (state.segment[:, 3:] == 0).all()


def test_lru_write_order_and_positions():
    memory = torch.zeros(1, 3, 2)
    positions = torch.full((1, 3), -1)
    order = []
    for step in (9, 19, 29, 39, 49, 59, 69):
        candidates = torch.full((1, 3, 2), float(step))
        new_memory, new_positions = lru_write(memory, positions, candidates, torch.tensor([step]), alpha=1.0)
        changed = (new_positions != positions).nonzero()[:, 1].tolist()
        assert len(changed) == 1
        order.append(changed[0])
        assert torch.equal(new_memory[0, changed[0]], torch.full((2,), float(step)))
        memory, positions = new_memory, new_positions
    # First the empty slots in order, then always the least recently written one.
    assert order == [0, 1, 2, 0, 1, 2, 0]
    assert positions.tolist() == [[69, 49, 59]]


def test_lru_empty_slot_hard_write_vs_blend():
    memory = torch.ones(1, 2, 3)
    positions = torch.tensor([[5, -1]])
    candidates = torch.full((1, 2, 3), 3.0)
    hard, _ = lru_write(memory, positions, candidates, torch.tensor([9]), alpha=0.25, hard_write_empty=True)
    blend, _ = lru_write(memory, positions, candidates, torch.tensor([9]), alpha=0.25, hard_write_empty=False)
    assert torch.equal(hard[0, 1], torch.full((3,), 3.0))
    assert torch.allclose(blend[0, 1], torch.full((3,), 0.25 * 3.0 + 0.75))
    assert torch.equal(hard[0, 0], memory[0, 0]) and torch.equal(blend[0, 0], memory[0, 0])


def test_lru_write_only_the_given_rows():
    gen = torch.Generator().manual_seed(0)
    memory, candidates = torch.randn(3, 2, 4, generator=gen), torch.randn(3, 2, 4, generator=gen)
    positions = torch.tensor([[5, -1], [5, 15], [-1, -1]])
    rows = torch.tensor([True, False, True])
    new_memory, new_positions = lru_write(memory, positions, candidates, torch.tensor([29] * 3), 0.5, rows=rows)
    assert torch.equal(new_memory[1], memory[1]) and torch.equal(new_positions[1], positions[1])
    everywhere = lru_write(memory, positions, candidates, torch.tensor([29] * 3), 0.5)
    assert torch.equal(new_memory[rows], everywhere[0][rows]) and torch.equal(new_positions[rows], everywhere[1][rows])
    assert new_positions[rows].tolist() == [[5, 29], [29, -1]]


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_forgetting_law(alpha):
    """A cue written once keeps weight (1 - alpha)^n after n blends into its slot."""
    gen = torch.Generator().manual_seed(0)
    cue = torch.randn(1, 1, 8, generator=gen)
    memory, positions = lru_write(torch.zeros(1, 1, 8), torch.full((1, 1), -1), cue, torch.tensor([0]), alpha)
    assert torch.equal(memory, cue)  # hard write into the empty slot
    later = []
    for n in range(1, 31):
        u = torch.randn(1, 1, 8, generator=gen)
        later.append(u)
        memory, positions = lru_write(memory, positions, u, torch.tensor([n]), alpha)
        closed_form = (1 - alpha) ** n * cue + sum(alpha * (1 - alpha) ** (n - k) * later[k - 1] for k in range(1, n + 1))
        torch.testing.assert_close(memory, closed_form, atol=1e-5, rtol=1e-5)
    # The cue's share, measured by linearity: change only the cue and see how much the slot moves.
    memory_b, positions_b = lru_write(torch.zeros(1, 1, 8), torch.full((1, 1), -1), cue + 1.0, torch.tensor([0]), alpha)
    for n, u in enumerate(later, start=1):
        memory_b, positions_b = lru_write(memory_b, positions_b, u, torch.tensor([n]), alpha)
    torch.testing.assert_close(memory_b - memory, torch.full_like(memory, (1 - alpha) ** 30), atol=1e-6, rtol=1e-4)


def test_model_commits_one_slot_per_completed_segment():
    model = _model(context_length=4, memory_size=3)
    state = model.initial_state(1)
    for segment in range(7):
        before = state
        for phase in range(4):
            _, state = model(torch.randn(1, 1, 5), state)
            if phase < 3:
                _assert_states_close(before._replace(segment=state.segment, step=state.step), state)
        changed = (state.positions != before.positions).any(dim=1)[0]  # [M]
        assert int(changed.sum()) == 1
        assert set(state.positions[0].flatten().tolist()) - {-1} <= {4 * s + 3 for s in range(segment + 1)}
        assert int(state.positions.max()) == 4 * segment + 3
        slot = int(changed.nonzero())
        untouched = [j for j in range(3) if j != slot]
        torch.testing.assert_close(state.memory[0, :, untouched], before.memory[0, :, untouched])


def _write_parameters(model: ElmurModel):
    return [p for layer in model.layers for m in (layer.write, layer.memory_mlp) for p in m.parameters()]


@pytest.mark.parametrize("detach", [False, True])
def test_gradients_through_memory_writes(detach):
    model = _model(context_length=4, memory_size=2, detach_memory=detach).train()
    x = torch.randn(3, 8, 5)
    out, _ = model(x, model.initial_state(3))
    # Outputs of the second segment depend on the write parameters only through memory written by the first.
    out[:, 4:].pow(2).sum().backward()
    grad_norm = sum(float(p.grad.abs().sum()) for p in _write_parameters(model) if p.grad is not None)
    if detach:
        assert grad_norm == 0.0
    else:
        assert grad_norm > 1e-10  # exactly 0.0 when detached


@pytest.mark.parametrize("norm, n_segments", [("post", 20_000), ("pre", 20_000),
                                              pytest.param("post", 100_000, marks=pytest.mark.slow)])
def test_memory_stays_bounded_over_many_segments(norm, n_segments):
    """Every slot is a convex combination of LayerNorm outputs and the initial content, so
    ||slot|| <= max(sqrt(D) * max|gamma| + ||beta||, max ||initial slot||)."""
    model = _model(input_dim=3, d_model=8, n_layers=1, n_heads=2, memory_size=2, context_length=1, alpha=0.7, norm=norm)
    last_norm = model.layers[0].ln_candidate if norm == "pre" else model.layers[0].ln_memory_mlp
    with torch.no_grad():
        last_norm.weight.uniform_(0.5, 2.0)
        last_norm.bias.uniform_(-1.0, 1.0)
    d = model.config.d_model
    with torch.no_grad():
        bound = math.sqrt(d) * float(last_norm.weight.abs().max()) + float(last_norm.bias.norm())
        bound = max(bound, float(model.memory_init.norm(dim=-1).max()))
    gen = torch.Generator().manual_seed(0)
    state = model.initial_state(2)
    peak = 0.0
    with torch.no_grad():
        for _ in range(n_segments // 2000):  # one-step segments
            x = torch.randn(2, 2000, 3, generator=gen) * 100.0
            out, state = model(x, state)
            assert torch.isfinite(out).all() and torch.isfinite(state.memory).all()
            peak = max(peak, float(state.memory.norm(dim=-1).max()))
    assert int(state.step[0]) == n_segments
    assert peak <= bound + 1e-4


def test_log_distance_bias_separates_ages_up_to_a_million_steps():
    model = _model()
    bias = model.layers[0].read_bias
    ages = torch.tensor([1, 10, 100, 1_000, 10_000, 100_000, 500_000, 1_000_000])
    buckets = bias.bucket(ages, torch.zeros_like(ages, dtype=torch.bool))
    assert buckets.unique().numel() == len(ages)
    assert bool((buckets[1:] > buckets[:-1]).all()) and int(buckets.max()) < bias.n_buckets

    clamped = _model(distance_bias="clamped").layers[0].read_bias
    far = clamped.bucket(torch.tensor([1023, 5_000, 1_000_000]), torch.zeros(3, dtype=torch.bool))
    assert far.unique().numel() == 1  # the reference's clamp: every old slot looks equally old


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"d_model": 10, "n_heads": 3}, "d_model"),
        ({"memory_size": 0}, "memory_size"),
        ({"context_length": 0}, "context_length"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"norm": "middle"}, "norm"),
        ({"distance_bias": "linear"}, "distance_bias"),
        ({"empty_slot_write": "soft"}, "empty_slot_write"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_layers": 2.5}, "n_layers"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ElmurConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"memory_init_std": float("inf")}, r"memory_init_std must be a finite number, got inf"),
        ({"memory_init_std": float("nan")}, r"memory_init_std must be a finite number, got nan"),
        ({"alpha": np.float32("nan")}, r"alpha must be a finite number"),
        ({"dropout": "0.1"}, r"dropout must be a finite number, got '0.1'"),
        ({"memory_init_std": -0.5}, r"memory_init_std must be >= 0, got -0.5"),
        ({"d_model": True}, r"d_model must be a positive integer, got True"),
        ({"n_heads": np.int64(0)}, r"n_heads must be a positive integer"),
        ({"distance_buckets": 16.0}, r"distance_buckets must be a positive integer, got 16.0"),
        ({"use_memory_read": "False"}, r"use_memory_read must be True or False, got 'False'"),
        ({"norm": None}, r"norm must be one of"),
    ],
)
def test_config_refuses_non_finite_and_wrongly_typed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElmurConfig(**kwargs)


def test_config_accepts_numpy_numbers_and_stores_plain_types():
    config = ElmurConfig(
        d_model=np.int64(16), n_layers=np.int32(1), memory_size=np.uint8(3), alpha=np.float32(0.5),
        dropout=np.float64(0.1), memory_init_std=1, use_memory_write=np.bool_(False),
    )
    for name, kind in (("d_model", int), ("n_layers", int), ("memory_size", int), ("alpha", float),
                       ("dropout", float), ("memory_init_std", float), ("use_memory_write", bool)):
        assert type(getattr(config, name)) is kind, name
    assert (config.d_model, config.alpha, config.use_memory_write) == (16, 0.5, False)
    assert ElmurModel(np.int64(5), config).input_dim == 5


@pytest.mark.parametrize("value", ["False", "no", 0, 1, None, 0.0])
def test_check_bool_refuses_what_is_not_a_bool(value):
    with pytest.raises(ValueError, match=f"flag must be True or False, got {value!r}"):
        check_bool("flag", value)


def test_check_bool_and_check_max_grad_norm_return_plain_types():
    assert check_bool("flag", np.bool_(False)) is False and check_bool("flag", True) is True
    assert type(check_max_grad_norm(np.float32(0.5))) is float
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"max_grad_norm must be > 0 .*got {bad}"):
            check_max_grad_norm(bad)


def test_check_int_names_the_argument_and_bound():
    assert type(check_int("n", np.int16(3))) is int
    with pytest.raises(ValueError, match="n must be a non-negative integer, got -1"):
        check_int("n", -1, minimum=0)
    with pytest.raises(ValueError, match="n must be an integer >= 8, got 7"):
        check_int("n", 7, minimum=8)


def test_bad_inputs_raise_clear_errors():
    model = _model()
    state = model.initial_state(2)
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(2, 3, 4), state)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.randn(3, 3, 5), state)
    with pytest.raises(ValueError, match="episode_starts"):
        model(torch.randn(2, 3, 5), state, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="input_dim"):
        ElmurModel(0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"norm": "post", "n_layers": 3},
        {"context_length": 1, "memory_size": 1},
        {"use_memory_write": False},
        {"use_memory_read": False, "empty_slot_write": "blend"},
        {"reservoir_layers": 1, "cross_segment_attention": "previous"},
        {"reservoir_layers": 2, "n_layers": 1, "norm": "pre"},
    ],
)
def test_step_with_layer_outputs_equals_sequence(kwargs):
    """Acting with the carried layer outputs (every layer computes the new token only) gives the outputs and
    states of the segment-parallel pass, also when the outputs are dropped and rebuilt from the state."""
    model = _model(**kwargs)
    gen = torch.Generator().manual_seed(2)
    n, t = 5, 41
    _, state = model(torch.randn(n, 6, 5, generator=gen), model.initial_state(n))
    x = torch.randn(n, t, 5, generator=gen)
    starts = torch.rand(n, t, generator=gen) < 0.08
    starts[0, 5] = starts[1, 0] = starts[2, 4] = True  # mid-segment, first step, segment start
    with torch.no_grad():
        seq_out, seq_state = model(x, state, starts)
        outputs, step_state = None, state
        for i in range(t):
            if i == 17:
                outputs = None  # as after unpacking a packed state
            out, step_state, outputs = model.step(x[:, i], step_state, starts[:, i], outputs)
            torch.testing.assert_close(out, seq_out[:, i], atol=1e-5, rtol=0)
    _assert_states_close(seq_state, step_state)


def test_attention_is_the_explicit_formula():
    """``Attention`` (one fused kernel) computes softmax(q k^T / sqrt(d_head) + bias) v per head, with the bias of
    acting (one query) and of training (a causal mask with -inf) alike."""
    torch.manual_seed(0)
    attention = Attention(ElmurConfig(d_model=16, n_heads=2))
    for tq, tk in ((1, 4), (4, 4)):
        queries, keys = torch.randn(3, tq, 16), torch.randn(3, tk, 16)
        bias = torch.randn(3, 2, tq, tk).masked_fill(torch.rand(3, 2, tq, tk) < 0.3, float("-inf"))
        bias[..., 0] = 0.0  # every query keeps a key
        q = attention.query(queries).view(3, tq, 2, 8).transpose(1, 2)
        k, v = attention.key_value(keys).view(3, tk, 2, 2, 8).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, dim=-1)
        expected = attention.proj((weights @ v).transpose(1, 2).reshape(3, tq, 16))
        torch.testing.assert_close(attention(queries, keys, bias), expected, atol=1e-6, rtol=0)


def test_read_init_std_sets_the_memory_reads_value_and_output_weights_only():
    torch.manual_seed(0)
    default = ElmurModel(6, ElmurConfig(read_init_std=0.02))  # every weight at the common std
    torch.manual_seed(0)
    larger = ElmurModel(6, ElmurConfig(read_init_std=0.1))
    for name, weight in larger.state_dict().items():
        expected = default.state_dict()[name].clone()
        if name.endswith("read.proj.weight"):
            expected *= 5
        elif name.endswith("read.key_value.weight"):
            expected[default.config.d_model:] *= 5  # the values; the keys keep the common init
        torch.testing.assert_close(weight, expected, atol=1e-7, rtol=0, msg=name)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="read_init_std"):
            ElmurConfig(read_init_std=bad)


@pytest.mark.parametrize("kwargs", [{}, {"cross_segment_attention": "previous"}, {"reservoir_layers": 1, "memory_size": 3}])
def test_config_state_fields_are_the_states_tensors(kwargs):
    # The one written layout (ElmurConfig.state_fields) must be the state the model makes: field names and order,
    # element counts and bytes; state_bytes (so ElmurConfig.check_memory) and the packed state's split read it.
    config = ElmurConfig(d_model=8, n_heads=2, context_length=5, **kwargs)
    state = ElmurModel(3, config).initial_state(1)
    fields = config.state_fields()
    assert [name for name, _, _ in fields] == ["step", "positions", "memory", "segment", "previous"]
    for name, count, size in fields:
        tensor = getattr(state, name)
        assert (tensor.numel(), tensor.element_size()) == (count, size), name
    assert config.state_bytes() == sum(t.numel() * t.element_size() for t in state)
    if config.previous_length:
        assert "cross_segment_attention='previous'" in config.describe()
