"""Parts shared by the algorithms: the ELMUR model in plain PyTorch (``config``, ``memory``, ``layers``, ``model``),
the policies that put it into Stable-Baselines3 (``policies``, ``backbone``: the packed state of sb3-contrib's
RecurrentPPO, ``actor``: acting step by step), evaluation, callbacks, argument checks, file helpers, and ``host_sync``
(the code paths that make a GPU wait, and a count of them on any machine)."""
