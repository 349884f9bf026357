"""ElmurPPO: PPO with ELMUR's own rollout buffer (memory once per segment, cached acting, memory credit across
rollouts)."""

from sb3_elmur.ppo.ppo import ElmurPPO

__all__ = ["ElmurPPO"]
