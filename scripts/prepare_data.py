"""Rule prepare_data: load, check, split and tokenise the labelled data (adaptune.data)."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

from typing import TYPE_CHECKING

from adaptune.data import run_prepare_data
from adaptune.logs import to_log_file
from adaptune.settings import DataSettings, ModelSettings

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    run_prepare_data(
        DataSettings.from_config(snakemake.params.data),
        ModelSettings.from_config(snakemake.params.model),
        split_paths={s: snakemake.output[s] for s in ("train", "val", "test")},
        info_path=snakemake.output.info,
    )
