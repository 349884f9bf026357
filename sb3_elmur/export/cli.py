"""Export a saved ELMUR policy's acting step to ONNX or TorchScript (``python -m sb3_elmur.export``).

    python -m sb3_elmur.export elmur_tmaze.zip --format onnx --out elmur_tmaze.onnx
    python -m sb3_elmur.export model.zip --format torchscript --out policy.pt --stochastic --batch-size 8

The model is a zip saved by RecurrentPPO (ElmurPolicy, CnnElmurPolicy, MultiInputElmurPolicy), ElmurPPO or
RecurrentBC. --out is checked before the model loads and written atomically, after the file has been run against
the policy's torch step (--check-steps). The inputs and outputs: docs/export.md, or
``python -c "import sb3_elmur.export; help(sb3_elmur.export)"``.
"""

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from sb3_elmur.common.utils import positive_int_argument
from sb3_elmur.export.loading import UnsupportedModelError
from sb3_elmur.export.writers import FORMATS, ExportCheckError, export_policy

PROG = "python -m sb3_elmur.export"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the description's examples kept as written."""


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("model", help="Path of the saved model (.zip).")
    parser.add_argument("--format", required=True, choices=FORMATS, help="File format.")
    parser.add_argument("--out", required=True, help="File to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    parser.add_argument("--stochastic", action="store_true",
                        help="Sample the action from an input 'noise' of uniform numbers (default: the greedy action).")
    parser.add_argument("--batch-size", type=positive_int_argument, default=None,
                        help="Rows per call, fixed in the file (default: any number).")
    parser.add_argument("--channels-last", action="store_true",
                        help="Take image observations channel-last, as a channel-last env gives them.")
    parser.add_argument("--check-steps", type=_non_negative_int, default=40,
                        help="Steps the written file is run against the torch step before it is kept (0: no check).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = _parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_dir():
        parser.error(f"--out {out} is a folder: give the file to write")
    if out.exists() and not args.overwrite:
        parser.error(f"--out {out} already exists: pass --overwrite to replace it, or choose another file")
    torch.set_num_threads(1)  # one small step: more threads only add overhead
    try:
        description = export_policy(
            args.model, out, format=args.format, deterministic=not args.stochastic, batch_size=args.batch_size,
            channels_last=args.channels_last, overwrite=args.overwrite, check_steps=args.check_steps,
        )
    except (FileNotFoundError, UnsupportedModelError, ValueError) as error:  # each names the file or argument
        parser.error(str(error))
    except ImportError as error:
        parser.error(f"{args.format} export needs packages that are not installed ({error}): pip install "
                     "'sb3-elmur[export]'")
    except ExportCheckError as error:
        parser.exit(1, f"{PROG}: error: {error}\n")
    batch = description["batch_size"] or "any"
    print(f"wrote {out} ({args.format}, {'greedy' if description['deterministic'] else 'sampled'} actions, "
          f"batch size {batch}) from {description['source']} ({description['policy_class']})")
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for spec in description[kind]:
            shape = ", ".join(str(size) for size in spec["shape"])
            print(f"  {spec['name']:<22} [{shape}] {spec['dtype']}")
    if "check" in description:
        check = description["check"]
        print(f"checked against the torch step over {args.check_steps} steps: largest difference "
              f"{check['action']:.1e} (action), {check['value']:.1e} (value), {check['state']:.1e} (state)")
    return description


if __name__ == "__main__":
    main()
