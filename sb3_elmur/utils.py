"""Small helpers shared by the command-line tools."""

from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm


def algorithm_class(name: str) -> type:
    """An algorithm class by name, looked up in sb3_elmur, sb3_contrib and stable_baselines3."""
    import sb3_contrib
    import stable_baselines3

    import sb3_elmur

    for module in (sb3_elmur, sb3_contrib, stable_baselines3):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseAlgorithm):
            return cls
    raise ValueError(f"unknown algorithm {name!r}: expected a class of sb3_elmur, sb3_contrib or stable_baselines3")


def load_algorithm(name: str, path: str, **kwargs: Any) -> BaseAlgorithm:
    """Load a saved model with the ``load`` of the algorithm class called ``name``."""
    return algorithm_class(name).load(path, **kwargs)
