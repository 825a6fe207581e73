"""What every job shares: argument conventions, Ray start-up, and one-line user errors.

Each job module exposes `add_arguments(parser)`, `run(args) -> int` and `main(argv=None)`;
`jobs.cli` mounts them as subcommands of the `u2net-ray` console script, and
`python -m jobs.<name>` runs the same code (that is the form `ray job submit` uses).
"""

from __future__ import annotations

import argparse
import errno
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
        # Workers at the driver's priority: Ray starts them at nice 15, under every other
        # process, so on a small machine each wake-up of the driver, the raylet or the GCS
        # preempts the model actors. Measured on 2 cores (BENCHMARKS.md): e2e 5.19 → 6.29
        # images/s. A cluster keeps its own setting.
        ray.init(num_cpus=int(num_cpus) if num_cpus else os.cpu_count(),
                 include_dashboard=False, logging_level=logging.WARNING,
                 _system_config={"worker_niceness": 0})


CONFIG_HELP = ("YAML or TOML file whose keys are this command's flags (e.g. `input-size: 320` or "
               "`input_size = 320`); flags given on the command line override it")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None, help=CONFIG_HELP)


def load_config_file(path: str) -> dict:
    """A flat mapping of flag names to values, from YAML (.yaml/.yml) or TOML (.toml)."""
    from pipeline import storage

    try:
        text = storage.read_bytes(path).decode()
    except FileNotFoundError:
        raise UserError(f"config file {path!r} does not exist") from None
    if path.lower().endswith(".toml"):
        import tomllib

        data = tomllib.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path!r} must be a mapping of flag names to values")
    return data


def apply_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """If argv names `--config FILE`, make the file's values the parser's defaults.

    Keys are flag names with or without dashes (`input-size`, `input_size`, `--input-size`).
    A required flag given in the file is no longer required on the command line; unknown keys
    are an error, so a typo in a config never goes unnoticed.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    if not known.config:
        return
    data = load_config_file(known.config)
    by_name = {}
    for action in parser._actions:  # argparse has no public accessor for its actions
        for opt in action.option_strings:
            by_name[opt.lstrip("-").replace("-", "_")] = action
    defaults = {}
    for key, value in data.items():
        action = by_name.get(str(key).lstrip("-").replace("-", "_"))
        if action is None or action.dest in ("help", "config"):
            parser.error(f"config file {known.config}: unknown option {key!r}")
        if isinstance(action, argparse._AppendAction) and not isinstance(value, list):
            value = [value]
        if action.type is not None and not isinstance(value, (list, bool)) and value is not None:
            value = action.type(value)
        if action.choices is not None and value not in action.choices:
            parser.error(f"config file {known.config}: {key}={value!r} is not one of {list(action.choices)}")
        defaults[action.dest] = value
        action.required = False
    parser.set_defaults(**defaults)


def job_main(build: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], int],
             prog: str, description: str, argv: Sequence[str] | None = None) -> int:
    # No abbreviated flags: `--norm` silently meaning `--normalize` today and breaking when a
    # flag is added tomorrow is worse than typing the name.
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    build(parser)
    add_config_argument(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        apply_config(parser, argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    except Exception as exc:
        if not storage_unavailable(exc):
            raise
        cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the worker's error
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        print(f"error: storage unavailable after retries ({type(cause).__name__}): {first}",
              file=sys.stderr)
        return 2


def storage_unavailable(exc: BaseException) -> bool:
    """Object storage that stayed unreachable, or kept answering 5xx/throttling, through the
    S3 client's own retries (`storage.s3_options`): a job-level condition like a missing
    input, reported in one line, not a bug whose traceback would help."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
    except ImportError:  # no S3 support installed: nothing of this kind can be raised
        return False
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, (BotoConnectionError, HTTPClientError)):  # refused, timed out, reset
        return True
    # s3fs turns S3 error replies into OSError: 503 SlowDown/ServiceUnavailable → EBUSY,
    # 500 InternalError → EREMOTEIO.
    return isinstance(cause, OSError) and cause.errno in (errno.EBUSY, errno.EREMOTEIO)
