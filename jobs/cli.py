"""The `u2net-ray` console script: one subcommand per job module.

`u2net-ray infer ...` and `python -m jobs.infer ...` run the same code with the same flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from jobs._common import UserError, add_config_argument, apply_config, run_guarded

# subcommand -> (module, one-line help). Modules are imported only when their command runs,
# so `u2net-ray --help` does not pay for importing Ray and torch.
COMMANDS = {
    "infer": ("jobs.infer", "batch inference: images → masks and mask_errors Parquet tables"),
    "reprocess": ("jobs.reprocess", "nightly incremental reprocessing into Iceberg tables"),
    "train": ("jobs.train", "distributed from-scratch training with Ray Train"),
    "evaluate": ("jobs.evaluate", "SOD metrics of a model on labelled data"),
    "make-dataset": ("jobs.make_dataset", "generate a synthetic labelled salient-object dataset"),
    "pack": ("jobs.pack", "pack loose images into WebDataset or Parquet shards"),
    "preview": ("jobs.preview", "contact sheet of input | mask | cutout from a mask table"),
    "export": ("jobs.export", "export a model to ONNX"),
    "demo": ("jobs.demo", "end-to-end demo on generated data"),
}


def build_parser(available_only: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="u2net-ray", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if available_only and exc.name == module_name:
                continue  # a job this version does not ship
            raise
        p = sub.add_parser(name, help=help_text, allow_abbrev=False,
                           description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.add_arguments(p)
        add_config_argument(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if command and sub is not None and command in sub.choices:
        try:
            apply_config(sub.choices[command], argv[argv.index(command) + 1:])
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    return run_guarded(args._run, args)


if __name__ == "__main__":
    sys.exit(main())
