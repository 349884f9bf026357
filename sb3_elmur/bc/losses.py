"""The behaviour-cloning loss of every action space SB3 has."""

from typing import Tuple

import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution


def action_loss(
    distribution: Distribution, actions: th.Tensor, mask: th.Tensor, action_space: spaces.Space,
    label_smoothing: float = 0.0, continuous_loss: str = "mse",
) -> Tuple[th.Tensor, th.Tensor]:
    """Per-step loss of the policy's ``distribution`` against the dataset's ``actions``, and (discrete actions) per-step
    correctness of the greedy action, both zero where ``mask`` is (padding).

    :param label_smoothing: of the cross-entropy of discrete actions
    :param continuous_loss: Box actions: "mse" (mean action against the target) or "nll" (Gaussian log-likelihood)
    """
    dist = distribution.distribution
    if isinstance(action_space, spaces.Discrete):
        target = actions.long().flatten()
        loss = F.cross_entropy(dist.logits, target, reduction="none", label_smoothing=label_smoothing)
        correct = (dist.logits.argmax(-1) == target).float()
    elif isinstance(action_space, spaces.MultiDiscrete):
        targets = actions.long().unbind(dim=1)
        loss = sum(
            F.cross_entropy(d.logits, t, reduction="none", label_smoothing=label_smoothing)
            for d, t in zip(dist, targets)
        )
        correct = th.stack([d.logits.argmax(-1) == t for d, t in zip(dist, targets)], dim=1).all(dim=1).float()
    elif isinstance(action_space, spaces.MultiBinary):
        target = actions.float()
        loss = F.binary_cross_entropy_with_logits(dist.logits, target, reduction="none").sum(dim=1)
        correct = ((dist.logits > 0).float() == target).all(dim=1).float()
    elif continuous_loss == "mse":
        loss = (distribution.mode() - actions.float()).pow(2).sum(dim=1)
        correct = th.zeros_like(loss)
    else:
        loss = -distribution.log_prob(actions.float())
        correct = th.zeros_like(loss)
    return loss * mask, correct * mask
