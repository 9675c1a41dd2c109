"""The ``adaptune`` command: checks outside the workflow.

adaptune check CONFIG [CONFIG ...]   validate experiments as the workflow would, naming the
                                      file, line and column of a YAML mistake
adaptune predict MODEL INPUT          a fine-tuned model folder's predictions, with probabilities,
                                      for a CSV of texts or image paths, or a folder of images
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


def predict(model: str, inputs: str, output: str, column: str | None, batch_size: int) -> int:
    from adaptune.prediction import predict_file

    try:
        frame = predict_file(model, inputs, column, batch_size)
    except AdaptuneError as err:
        print(f"adaptune predict: {err}", file=sys.stderr)
        return 1
    if output == "-":
        frame.to_csv(sys.stdout, index=False)
    else:
        frame.to_csv(output, index=False)
        print(f"{len(frame)} predictions written to {output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check", help="validate experiment config files")
    checking.add_argument("configs", nargs="+", metavar="CONFIG")
    predicting = commands.add_parser(
        "predict", help="run a fine-tuned model on new inputs (CSV or image folder)"
    )
    predicting.add_argument("model", help="a model folder: results/.../runs/.../model")
    predicting.add_argument("inputs", help="a CSV (texts or image paths) or a folder of images")
    predicting.add_argument("-o", "--output", default="-", help="CSV to write (default: stdout)")
    predicting.add_argument("--column", help="the CSV's input column (default: text or image)")
    predicting.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.command == "predict":
        return predict(args.model, args.inputs, args.output, args.column, args.batch_size)
    return 1 if check(args.configs) else 0


if __name__ == "__main__":
    sys.exit(main())
