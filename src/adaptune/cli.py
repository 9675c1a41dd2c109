"""The ``adaptune`` command: checks outside the workflow.

adaptune check CONFIG [CONFIG ...]   validate experiments as the workflow would, naming the
                                      file, line and column of a YAML mistake
adaptune predict MODEL INPUT          a fine-tuned model folder's predictions, with probabilities,
                                      for a CSV of texts or image paths, or a folder of images
adaptune sync-mlflow CONFIG [...]     log an experiment's finished runs into its MLflow store
                                      again from their files (a store deleted, replaced or
                                      changed; one that stopped answering): nothing retrains
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    from adaptune.prediction import predict_file  # torch and the models: not for `check`

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


def merged(configs: list[dict]) -> dict:
    """Config files merged as ``snakemake --configfile A B`` merges them (B's keys win)."""
    result: dict = {}
    for config in configs:
        for key, value in config.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merged([result[key], value])
            else:
                result[key] = value
    return result


def sync_mlflow(paths: list[str]) -> int:
    """Bring the experiment's MLflow store up to date with its files (run in the workflow's
    folder, where ``results/`` is); print what was done."""
    from adaptune.records import sync  # (the stages' modules: see adaptune.records)

    try:
        config = merged([read_config_file(path) for path in paths])
        validate_config(config, main_process=True, devices=False)
        tracking_uri = config["mlflow"]["tracking_uri"]
        name = config["mlflow"]["experiment_name"] or config["experiment"]
        results = Path("results") / config["experiment"]
        done = sync(tracking_uri, name, results / "mlartifacts", results)
    except AdaptuneError as err:
        print(f"adaptune sync-mlflow: {err}", file=sys.stderr)
        return 1
    print(f"MLflow at {tracking_uri}, experiment {name!r} (id {done['experiment_id']}):")
    if not done["relogged"]:
        print(f"  it holds every finished run of {results}; nothing to log")
    for key, run_id in done["relogged"].items():
        print(f"  {key}: logged again from its files as run {run_id}")
    for model, version in done["champions"].items():
        print(f"  registered model {model}: version {version} is @champion")
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
    syncing = commands.add_parser(
        "sync-mlflow",
        help="log an experiment's finished runs into its MLflow store again, from their files",
    )
    syncing.add_argument("configs", nargs="+", metavar="CONFIG")
    args = parser.parse_args(argv)
    if args.command == "sync-mlflow":
        return sync_mlflow(args.configs)
    if args.command == "predict":
        return predict(args.model, args.inputs, args.output, args.column, args.batch_size)
    return 1 if check(args.configs) else 0


if __name__ == "__main__":
    sys.exit(main())
