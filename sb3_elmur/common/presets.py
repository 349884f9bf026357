"""Hyper-parameters we use on T-Maze (quick start, learning test, benchmark and zoo configs agree on them)."""

from typing import Any, Dict

# RecurrentPPO settings for T-Maze: minibatches of 128 steps, 4 epochs; ent_coef > 0 keeps exploration alive
# (with ent_coef = 0 the LSTM baseline was seen to collapse after solving the task).
TMAZE_PPO_KWARGS: Dict[str, Any] = dict(
    n_steps=128,
    batch_size=128,
    n_epochs=4,
    learning_rate=3e-4,
    ent_coef=0.01,
    gamma=0.99,
)

# ElmurPolicy for T-Maze: the paper's context of 10 steps and 2 slots per layer, in a small model (43k parameters).
TMAZE_POLICY_KWARGS: Dict[str, Any] = dict(d_model=32, n_layers=1, n_heads=2, memory_size=2, context_length=10)

# The LSTM baseline at a similar parameter count (44k).
TMAZE_LSTM_POLICY_KWARGS: Dict[str, Any] = dict(lstm_hidden_size=56)

# POPGym comparison (benchmarks/results/popgym): the T-Maze PPO settings with learning rate 1e-3 (which also
# helped the LSTM), and ELMUR with two layers, 4 slots and a 20-step context, chosen on seed 0 of the six tasks
# among 1-2 layers, 2-4 slots and 10-20 steps at about the LSTM's parameter count.
POPGYM_PPO_KWARGS: Dict[str, Any] = {**TMAZE_PPO_KWARGS, "learning_rate": 1e-3}
POPGYM_POLICY_KWARGS: Dict[str, Any] = dict(d_model=24, n_layers=2, n_heads=2, memory_size=4, context_length=20)
POPGYM_LSTM_POLICY_KWARGS: Dict[str, Any] = dict(TMAZE_LSTM_POLICY_KWARGS)
