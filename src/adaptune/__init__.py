"""adaptune: importance-guided adaptive fine-tuning of pretrained models.

Every stage of the Snakemake workflow is a thin script over one module of this package:
``prepare_data`` -> :mod:`adaptune.data`, ``score_importance`` -> :mod:`adaptune.importance`,
``make_freeze_plan`` -> :mod:`adaptune.plans`, ``finetune`` -> :mod:`adaptune.training`,
``evaluate`` -> :mod:`adaptune.evaluation`, ``report`` -> :mod:`adaptune.report`.
"""

__version__ = "0.1.0"
