"""Which tasks there are and whether one can run here: the MIKASA-Robo ids, the check of a task id and its assets,
and the registration of every task as ``sb3_elmur/<task id>``."""

from typing import List

import gymnasium as gym

from sb3_elmur.envs import mikasa_family
from sb3_elmur.envs.maniskill.loading import _import_maniskill, _import_mikasa


class MissingAssetsError(RuntimeError):
    """A ManiSkill task needs assets that are not downloaded (and cannot be, from this machine)."""


def mikasa_env_ids() -> List[str]:
    """The MIKASA-Robo task ids (imports the suite)."""
    _import_mikasa()
    from mani_skill.utils.registration import REGISTERED_ENVS

    return sorted(env_id for env_id, spec in REGISTERED_ENVS.items()
                  if spec.cls.__module__.startswith("mikasa_robo_suite.rl."))


def check_task(env_id: str) -> bool:
    """Check that ``env_id`` is a ManiSkill or MIKASA-Robo task whose assets are here.

    :return: whether it is a MIKASA-Robo task
    :raise gymnasium.error.NameNotFound: for an unknown id
    :raise MissingAssetsError: for a task whose assets are not downloaded
    """
    _import_maniskill()
    mikasa = mikasa_family(env_id) is not None
    if mikasa:
        _import_mikasa()
    import mani_skill
    from mani_skill.utils import assets
    from mani_skill.utils.registration import REGISTERED_ENVS

    if env_id not in REGISTERED_ENVS:
        raise gym.error.NameNotFound(f"{env_id!r} is neither a ManiSkill nor a MIKASA-Robo task id")
    missing = []
    for asset_id in REGISTERED_ENVS[env_id].asset_download_ids or []:
        sources = (assets.expand_data_group_into_individual_data_source_ids(asset_id)
                   if asset_id in assets.DATA_GROUPS else [asset_id])
        missing += [source for source in sources if not assets.is_data_source_downloaded(source)]
    if missing:
        raise MissingAssetsError(
            f"{env_id} needs ManiSkill assets that are not in {mani_skill.ASSET_DIR}: "
            f"{', '.join(sorted(set(missing)))}. Download them where their server can be reached "
            f"(python -m mani_skill.utils.download_asset {' '.join(REGISTERED_ENVS[env_id].asset_download_ids)}) and "
            "copy the folder here (MS_ASSET_DIR names another place)"
        )
    return mikasa


def register_maniskill_envs() -> List[str]:
    """Register every ManiSkill task (and MIKASA-Robo task, where the suite is installed) as
    ``sb3_elmur/<task id>``, a :class:`ManiSkillEnv` (for rl-zoo3: ``--gym-packages sb3_elmur.envs.maniskill``).

    :return: the registered ids
    """
    _import_maniskill()
    try:
        _import_mikasa()
    except ImportError:
        pass
    from mani_skill.utils.registration import REGISTERED_ENVS

    ids = []
    for env_id in REGISTERED_ENVS:
        ours = f"sb3_elmur/{env_id}"
        if ours not in gym.registry:  # the task truncates itself: no max_episode_steps here
            gym.register(ours, entry_point="sb3_elmur.envs.maniskill:ManiSkillEnv", kwargs=dict(env_id=env_id))
        ids.append(ours)
    return ids
