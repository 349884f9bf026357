"""The ElmurPolicy of a saved model zip (RecurrentPPO, ElmurPPO or RecurrentBC), loaded without its algorithm."""

import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch as th
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.save_util import load_from_zip_file

from sb3_elmur.common.policies import ElmurPolicy
from sb3_elmur.common.utils import zip_path, zip_problem


class UnsupportedModelError(ValueError):
    """A saved model that cannot be exported: not an SB3 zip, or a policy that is not an ElmurPolicy."""


# What a damaged or foreign file raises from SB3's zip reader (zipfile, json, torch's reader, pickle).
_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, AttributeError, zipfile.BadZipFile,
                pickle.UnpicklingError)


def load_elmur_policy(path: Union[str, Path]) -> Tuple[ElmurPolicy, Dict[str, Any]]:
    """Build the policy of a model zip saved by RecurrentPPO (with ElmurPolicy, CnnElmurPolicy or
    MultiInputElmurPolicy), ElmurPPO or RecurrentBC, with its weights, on the CPU, in evaluation mode.

    Only the policy is read: the algorithm's other state (optimizer, rollout buffer, RecurrentBC's final-action
    head, which never acts) is left out.

    :param path: the zip (``.zip`` may be left out, as with SB3's ``load``)
    :return: the policy, and where it comes from (``policy_class``: its class name, ``file``: the zip read)
    :raises FileNotFoundError: no such file
    :raises UnsupportedModelError: the file is not a model saved by SB3, or its policy is not an ElmurPolicy (an MLP
        or LSTM policy has no ELMUR state to export), named
    """
    file = zip_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    problem = zip_problem(file)
    if problem is not None:
        raise UnsupportedModelError(f"{file} is not a readable saved model: {problem}")
    try:
        data, params, _ = load_from_zip_file(file, device="cpu")
    except _READ_ERRORS as error:
        raise UnsupportedModelError(f"{file} is not a readable saved model ({type(error).__name__}: {error})") from error
    policy_class = data.get("policy_class") if data else None
    if not isinstance(policy_class, type):
        raise UnsupportedModelError(f"{file} records no policy class that can be loaded here (saved by another "
                                    "version of Stable-Baselines3, or not by Stable-Baselines3 at all)")
    if not issubclass(policy_class, ElmurPolicy):
        name = f"{policy_class.__module__}.{policy_class.__qualname__}"
        if issubclass(policy_class, RecurrentActorCriticPolicy):
            kind = f"an LSTM policy ({name}, as MlpLstmPolicy), whose recurrent state is an LSTM's, not ELMUR's memory"
        else:
            kind = f"a {name} policy, not an ElmurPolicy (a feed-forward policy has no state: see SB3's export guide)"
        raise UnsupportedModelError(
            f"{file} holds {kind}: sb3_elmur.export exports ELMUR policies only (ElmurPolicy, CnnElmurPolicy or "
            "MultiInputElmurPolicy, as saved by RecurrentPPO, ElmurPPO or RecurrentBC)"
        )
    if "policy" not in params:
        raise UnsupportedModelError(f"{file} holds no policy weights (no policy.pth in the zip)")
    # The policy as the algorithms build it (policy_kwargs as saved; RecurrentBC saves its ortho_init=False there);
    # the learning rate only sets the optimizer's, which acting never uses.
    policy = policy_class(data["observation_space"], data["action_space"], lambda _: 0.0, **data.get("policy_kwargs", {}))
    try:
        policy.load_state_dict(params["policy"])
    except RuntimeError as error:
        raise UnsupportedModelError(f"{file}: the saved weights do not fit its {policy_class.__name__} ({error})") from error
    policy.set_training_mode(False)
    for parameter in policy.parameters():
        parameter.requires_grad_(False)
    return policy.to(th.device("cpu")), {"policy_class": policy_class.__name__, "file": str(file)}
