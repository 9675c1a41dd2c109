"""Rule make_freeze_plan: a strategy's reviewable freeze plan (adaptune.plans)."""

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from adaptune.logs import to_log_file
from adaptune.plans import build_plan, plot_plan, read_scores
from adaptune.settings import StrategySettings

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    name = snakemake.wildcards.strategy
    strategy = StrategySettings.from_config(name, snakemake.params.strategy)
    plan = build_plan(read_scores(snakemake.input.scores), name, strategy)
    plan.save(snakemake.output.plan)
    Path(snakemake.output.summary).write_text(plan.to_markdown())
    plot_plan(plan, snakemake.output.figure)
    logging.getLogger("adaptune").info("%s: %s", name, plan.totals)
