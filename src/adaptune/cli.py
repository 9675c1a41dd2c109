"""The ``adaptune`` command: checks outside the workflow.

adaptune check CONFIG [CONFIG ...]   validate experiments as the workflow would, naming the
                                      file, line and column of a YAML mistake
"""

from __future__ import annotations

import argparse
import sys

from adaptune.config import read_config_file
from adaptune.errors import AdaptuneError
from adaptune.experiment import validate_config


def check(paths: list[str]) -> int:
    """Validate each config file; print one line per file. Returns the number that failed."""
    failed = 0
    for path in paths:
        try:
            experiment = validate_config(read_config_file(path), main_process=True)
        except AdaptuneError as err:
            print(f"{path}: {err}" if not str(err).startswith(path) else str(err))
            failed += 1
        else:
            print(f"{path}: valid ({experiment.modality.name})")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check", help="validate experiment config files")
    checking.add_argument("configs", nargs="+", metavar="CONFIG")
    args = parser.parse_args(argv)
    return 1 if check(args.configs) else 0


if __name__ == "__main__":
    sys.exit(main())
