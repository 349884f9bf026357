"""Export a trained ELMUR policy as one acting step, ONNX or TorchScript, with its memory as explicit state.

    python -m sb3_elmur.export MODEL.zip --format onnx --out policy.onnx
    python sb3_elmur/export/runner.py policy.onnx --env CartPole-v1      # numpy + onnxruntime only

``export_policy(model, out, format="onnx")`` does the same from Python. The file computes one step of N rows as a
pure function, ``(observation, state..., episode_start[, noise]) -> (action, value, state...)``, for policies saved by
RecurrentPPO (ElmurPolicy, CnnElmurPolicy, MultiInputElmurPolicy), ElmurPPO and RecurrentBC. Inside it: SB3's
observation preprocessing (images scaled, Discrete one-hot, Dict observations through their extractors), the ELMUR
backbone, the heads, and for Box actions the clipping that ``predict`` does. Outside it: VecNormalize's observation
statistics, if training used them.

Inputs, in this order (ONNX names; the TorchScript module takes them positionally); N rows, ``L = n_layers``
(plus ``reservoir_layers``), ``M = memory_size``, ``D = d_model``, ``K = context_length``:

=================  ===============  =======  ==========================================================================
name               shape            dtype    meaning
=================  ===============  =======  ==========================================================================
``obs``            [N, *obs shape]  space's  observation (a Dict space: ``obs.<key>`` per key, in the space's order)
``memory``         [N, L, M, D]     float32  memory slots of every layer
``positions``      [N, L, M]        int64    episode step of each slot's last write, -1 for a slot never written
``segment``        [N, K-1, D]      float32  input tokens of the current segment (the first ``step % K`` valid)
``step``           [N]              int64    steps taken in the current episode
``previous``       [N, L, K, D]     float32  only with cross-segment attention: every layer's inputs over the
                                             episode's last completed segment
``cache``          [N, L, K, D]     float32  every layer's outputs at the current segment's positions
``episode_start``  [N]              bool     True where the observation is an episode's first
``noise``          [N, noise_size]  float32  stochastic files only: uniform numbers in [0, 1)
=================  ===============  =======  ==========================================================================

Outputs: ``action`` [N, *action shape] (int64 for Discrete and MultiDiscrete, float32 0/1 for MultiBinary as
``predict`` gives them, float32 clipped to the bounds for Box), ``value`` [N] float32, then the state after the step:
``memory_out``, ``positions_out``, ``segment_out``, ``step_out`` (``previous_out``), ``cache_out``. With a separate critic backbone
(``shared_backbone=False``) its state follows the actor's as ``critic_memory`` ... ``critic_cache`` (inputs) and
``critic_memory_out`` ... (outputs).

The state: feed each ``*_out`` back as the next step's input. Its starting value does not matter: a row whose
``episode_start`` is True is reset inside the step (memory to the model's initial content, positions to -1, segment
and step to 0), so zeros with ``episode_start`` True start an episode. ``cache`` holds what ``ElmurModel.step`` keeps
between calls (the layer outputs of the segment's earlier positions, which do not change within a segment): with it a
step computes the new token only. The step's branches (an episode start, a segment's memory write) are masks, so every
step runs the same graph.

``noise``: the stochastic file samples from uniform numbers the caller draws, so the caller owns the randomness
(seeding, replay): ``noise_size`` is one number per category for Discrete and MultiDiscrete (Gumbel-max), one per
action for MultiBinary (``u < p``), two per dimension for Box (Box-Muller). Same distribution as ``predict``'s samples,
not the same draws.

The file stores its description (these names and shapes, the action space, ``deterministic``, ``batch_size``,
``noise_size``, the ELMUR config) as JSON under the key ``sb3_elmur.export``: the ONNX model's metadata, or an extra
file of the TorchScript archive (:func:`read_description` reads either). ``batch_size``: None (default) exports a
dynamic batch dimension; a number fixes it in the ONNX graph. More (sampling, images, the runner): ``docs/export.md``.
"""

from sb3_elmur.export.loading import UnsupportedModelError, load_elmur_policy
from sb3_elmur.export.step import ExportedStep, TensorSpec
from sb3_elmur.export.writers import FORMATS, METADATA_KEY, export_policy, read_description

__all__ = [
    "FORMATS",
    "METADATA_KEY",
    "ExportedStep",
    "TensorSpec",
    "UnsupportedModelError",
    "export_policy",
    "load_elmur_policy",
    "read_description",
]
