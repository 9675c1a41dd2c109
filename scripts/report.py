"""Rule report: the leaderboard over strategies, shot counts and seeds (adaptune.report)."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

from typing import TYPE_CHECKING

from adaptune.logs import to_log_file
from adaptune.report import run_report

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    run_report(
        list(snakemake.input.metrics),
        snakemake.params.experiment,
        dict(snakemake.output.items()),
        config=snakemake.params.config,
        experiment_path=snakemake.input.experiment,
        description=snakemake.input.description,
    )
