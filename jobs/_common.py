"""What every job shares: argument conventions, Ray start-up, and one-line user errors.

Each job module exposes `add_arguments(parser)`, `run(args) -> int` and `main(argv=None)`;
`jobs.cli` mounts them as subcommands of the `u2net-ray` console script, and
`python -m jobs.<name>` runs the same code (that is the form `ray job submit` uses).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

log = logging.getLogger("u2net_ray")


class UserError(Exception):
    """A problem the user can fix (bad flag, missing input, missing weights): one line, no trace."""


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (e.g. 'auto' or ray://host:10001). Default: "
                             "RAY_ADDRESS when set (as under `ray job submit`), else a local "
                             "Ray started for this job.")
    parser.add_argument("--num-cpus", type=float, default=None,
                        help="logical CPUs of the local Ray started when no cluster is given "
                             "(default: this machine's cores)")


def init_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Connect to a cluster, or start a local Ray sized for this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Data's progress bars are the run's progress report; keep its INFO logs, not Ray's.
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=int(num_cpus) if num_cpus else os.cpu_count(),
                 include_dashboard=False, logging_level=logging.WARNING)


def job_main(build: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], int],
             prog: str, description: str, argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    build(parser)
    args = parser.parse_args(argv)
    return run_guarded(run, args)


def run_guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a job; user errors become one line on stderr and exit code 2."""
    from pipeline.storage import StorageError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return int(run(args) or 0)
    except (UserError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
