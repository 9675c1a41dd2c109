"""Rule make_freeze_plan: a strategy's reviewable freeze plan (adaptune.strategies)."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from adaptune import strategies
from adaptune.figures import plot_plan
from adaptune.logs import to_log_file
from adaptune.plans import ScoreTables
from adaptune.settings import TrainSettings

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    name = snakemake.wildcards.strategy
    tables = ScoreTables.read(snakemake.input.scores, snakemake.input.layers)
    train = TrainSettings.from_config(snakemake.params.train)
    plan = strategies.build_plan(tables, name, snakemake.params.strategy, train)
    plan.save(snakemake.output.plan)
    Path(snakemake.output.summary).write_text(plan.to_markdown())
    plot_plan(plan, snakemake.output.figure)
    logging.getLogger("adaptune").info("%s: %s", name, plan.totals)
