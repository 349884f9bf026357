"""Step an env with an ELMUR policy exported to ONNX, with numpy and onnxruntime only (no torch, no Stable-Baselines3).

    python sb3_elmur/export/runner.py policy.onnx --env CartPole-v1 --episodes 10
    python sb3_elmur/export/runner.py elmur_tmaze.onnx --env sb3_elmur:sb3_elmur/PassiveTMaze-v0 \\
        --env-kwargs '{"corridor_length": 10}'

A reference for robot code: :class:`OnnxPolicy` holds the recurrent state (named arrays, fed back after each step)
and is what to port; :func:`run_episodes` steps a gymnasium env with it. The file is self-contained: copy it, or run
it by its path as above (``python -m`` would import the sb3_elmur package, and torch with it). gymnasium is imported
only to make the env; an id of the form ``module:EnvId`` imports ``module`` first (gymnasium's rule), which for
sb3_elmur's own envs imports the package, and torch with it (the env's import, not the runner's).
"""

import argparse
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

# Where sb3_elmur.export stores the file's description (input and output names, shapes, the action space).
METADATA_KEY = "sb3_elmur.export"
LAYOUT_VERSION = 1

Observation = Union[np.ndarray, Dict[str, np.ndarray]]


class OnnxPolicy:
    """An exported ELMUR policy acting for ``batch_size`` rows, its recurrent state kept between calls.

    :param path: the ONNX file written by ``python -m sb3_elmur.export``
    :param batch_size: rows per call (a file exported with a fixed batch size takes that one only)
    :param seed: seed of the noise a stochastic file samples its actions from (None: fresh entropy)
    :param threads: onnxruntime's intra-op threads (1: a small model's step gains nothing from more)
    :raises ValueError: the file was not written by sb3_elmur.export, or a batch size it does not take
    """

    def __init__(self, path: str, batch_size: int = 1, seed: Optional[int] = None, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path} was not written by sb3_elmur.export (no {METADATA_KEY!r} metadata)")
        self.description: Dict[str, Any] = json.loads(metadata[METADATA_KEY])
        if self.description.get("layout_version") != LAYOUT_VERSION:
            raise ValueError(f"{path} has layout version {self.description.get('layout_version')}, this runner reads "
                             f"{LAYOUT_VERSION}: use the runner of the sb3_elmur version that exported it")
        fixed = self.description["batch_size"]
        if fixed is not None and batch_size != fixed:
            raise ValueError(f"{path} was exported for batch size {fixed}, not {batch_size}")
        self.batch_size = batch_size
        self.inputs = {spec["name"]: spec for spec in self.description["inputs"]}
        self.obs_names = [name for name in self.inputs if name == "obs" or name.startswith("obs.")]
        self.state_names = [name for name in self.inputs if name not in self.obs_names + ["episode_start", "noise"]]
        self.output_names = [spec["name"] for spec in self.description["outputs"]]
        self.noise_size = int(self.description["noise_size"])
        self.rng = np.random.default_rng(seed)
        # Any starting value will do: a row whose episode starts is reset inside the step.
        self.state = {name: np.zeros((batch_size, *self.inputs[name]["shape"][1:]), self.inputs[name]["dtype"])
                      for name in self.state_names}
        self._pending_start = np.ones(batch_size, dtype=bool)

    def reset(self, rows: Optional[np.ndarray] = None) -> None:
        """Start new episodes at the next :meth:`act` (of every row, or of ``rows``: indices or a bool mask)."""
        if rows is None:
            self._pending_start[:] = True
        else:
            self._pending_start[rows] = True

    def _feed(self, name: str, value: Any) -> np.ndarray:
        spec = self.inputs[name]
        array = np.asarray(value, dtype=spec["dtype"])
        expected = (self.batch_size, *spec["shape"][1:])
        if array.shape != expected:
            raise ValueError(f"{name} has shape {array.shape}, the policy takes {expected} (batch first)")
        return array

    def act(self, observation: Observation, episode_start: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """One step of every row: its action and value; the state moves on.

        :param observation: [batch, ...] observations (a dict of them, by key, for a Dict space)
        :param episode_start: [batch] bool, True where the observation starts an episode (besides the rows
            :meth:`reset` marked, and the first call's)
        :return: actions [batch, ...] and values [batch]
        """
        feeds = {name: self._feed(name, value) for name, value in self.state.items()}
        for name in self.obs_names:
            feeds[name] = self._feed(name, observation[name[4:]] if name != "obs" else observation)
        starts = self._pending_start.copy()
        if episode_start is not None:
            starts |= np.asarray(episode_start, dtype=bool).reshape(self.batch_size)
        feeds["episode_start"] = starts
        if self.noise_size:
            feeds["noise"] = self.rng.random((self.batch_size, self.noise_size), dtype=np.float32)
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        self.state = {name: outputs[f"{name}_out"] for name in self.state_names}
        self._pending_start[:] = False
        return outputs["action"], outputs["value"]


def _batched(observation: Any) -> Observation:
    """One env's observation as a batch of one row."""
    if isinstance(observation, dict):
        return {key: np.asarray(value)[None] for key, value in observation.items()}
    return np.asarray(observation)[None]


def _env_action(action: np.ndarray, action_type: str) -> Any:
    """One row's action as the env takes it: a Python int for Discrete, int8 for MultiBinary, the array otherwise."""
    if action_type == "Discrete":
        return int(action)
    if action_type == "MultiBinary":
        return action.astype(np.int8)
    return action


def run_episodes(policy: OnnxPolicy, env: Any, n_episodes: int, seed: Optional[int] = None) -> List[Dict[str, Any]]:
    """Play ``n_episodes`` of a gymnasium env (one at a time: the policy's batch size must be 1).

    :param policy: the exported policy
    :param env: a gymnasium env of the policy's spaces
    :param seed: seed of the first episode's reset (episode i: seed + i); None: unseeded
    :return: per episode its ``return``, ``length`` and, where the env reports it, ``is_success``
    """
    if policy.batch_size != 1:
        raise ValueError(f"run_episodes steps one env: the policy must act for 1 row, not {policy.batch_size}")
    action_type = policy.description["action_space"]["type"]
    episodes = []
    for episode in range(n_episodes):
        observation, info = env.reset(seed=None if seed is None else seed + episode)
        policy.reset()
        total, length, done = 0.0, 0, False
        while not done:
            action, _ = policy.act(_batched(observation))
            observation, reward, terminated, truncated, info = env.step(_env_action(action[0], action_type))
            total, length, done = total + float(reward), length + 1, terminated or truncated
        record: Dict[str, Any] = {"return": total, "length": length}
        if "is_success" in info:
            record["is_success"] = bool(info["is_success"])
        episodes.append(record)
    return episodes


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python sb3_elmur/export/runner.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("policy", help="The ONNX file written by python -m sb3_elmur.export.")
    parser.add_argument("--env", required=True, help="Gymnasium env id (module:EnvId imports module first).")
    parser.add_argument("--env-kwargs", default="{}", help="JSON object of the env's keyword arguments.")
    parser.add_argument("--episodes", type=int, default=10, help="Episodes to play.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the env resets and of the action noise.")
    parser.add_argument("--threads", type=int, default=1, help="Onnxruntime's intra-op threads.")
    args = parser.parse_args(argv)
    try:
        env_kwargs = json.loads(args.env_kwargs)
    except json.JSONDecodeError as error:
        parser.error(f"--env-kwargs is not JSON: {error}")
    if not isinstance(env_kwargs, dict):
        parser.error(f"--env-kwargs must be a JSON object, got {args.env_kwargs}")
    if args.episodes < 1:
        parser.error(f"--episodes must be a positive integer, got {args.episodes}")
    try:
        policy = OnnxPolicy(args.policy, seed=args.seed, threads=args.threads)
    except ValueError as error:
        parser.error(str(error))
    except Exception as error:  # onnxruntime's own (a missing file, not a model): one line
        parser.error(f"cannot load {args.policy}: {type(error).__name__}: {error}")
    import gymnasium as gym

    env = gym.make(args.env, **env_kwargs)
    episodes = run_episodes(policy, env, args.episodes, seed=args.seed)
    for i, episode in enumerate(episodes):
        success = f", success {episode['is_success']}" if "is_success" in episode else ""
        print(f"episode {i}: return {episode['return']:.2f}, {episode['length']} steps{success}")
    mean = sum(episode["return"] for episode in episodes) / len(episodes)
    line = f"mean return {mean:.2f} over {len(episodes)} episodes"
    if all("is_success" in episode for episode in episodes):
        line += f", success {sum(episode['is_success'] for episode in episodes) / len(episodes):.2f}"
    print(line)
    return episodes


if __name__ == "__main__":
    main()
