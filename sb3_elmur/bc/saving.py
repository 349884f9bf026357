"""How a RecurrentBC zip keeps its final-action head, and how the zips of earlier versions are read."""

from typing import Any, Dict, Optional, Tuple

import torch as th


def to_cpu(value: Any) -> Any:
    """``value`` (a state dict, nested in dicts and lists) with its tensors moved to the CPU: a zip saved on a GPU
    machine must load on one without CUDA, and the state is unpickled where it was saved."""
    if isinstance(value, th.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def split_old_final_action_head(params: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Optional[Any]]]:
    """The parameters of a zip whose final-action head was a torch file of its own and a second parameter group
    of the policy's optimizer, split: the rest of the parameters, and the head's state (``head``, and ``optimizer``:
    its group's Adam state, or None)."""
    params = dict(params)
    head = params.pop("final_action_head")
    optimizer = params.get("policy.optimizer")
    head_optimizer = None
    if optimizer is not None and len(optimizer["param_groups"]) == 2:
        groups = optimizer["param_groups"]

        def only(group: Dict[str, Any]) -> Dict[str, Any]:
            ids = set(group["params"])
            return {"state": {i: s for i, s in optimizer["state"].items() if i in ids}, "param_groups": [group]}

        params["policy.optimizer"], head_optimizer = only(groups[0]), only(groups[1])
    return params, {"head": head, "optimizer": head_optimizer}
