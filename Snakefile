# adaptune: importance-guided adaptive fine-tuning of a pretrained model.
# Stages: prepare_data -> score_importance -> make_freeze_plan -> finetune -> evaluate -> report.
# The experiment is config/config.yaml (documented by config/schema.yaml); see README.md.


# config/config.yaml is the default experiment. An experiment given with --configfile stands on
# its own: its missing keys take the schema's defaults, not config.yaml's values (so its
# strategies are exactly the ones it lists). --config KEY=VALUE overrides either.
if not workflow.overwrite_configfiles:
    # Read by adaptune first, where it is installed, so that a YAML mistake names its line.
    try:
        from adaptune.config import read_config_file
    except ImportError:
        pass
    else:
        read_config_file("config/config.yaml")

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/fetch.smk"
include: "rules/data.smk"
include: "rules/importance.smk"
include: "rules/plan.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/baseline.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
        stage_outputs(),
