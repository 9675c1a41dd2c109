"""One exception type per kind of problem; each message names the key, file or column at fault
and what would fix it."""


class AdaptuneError(Exception):
    """Base class of every error adaptune raises on purpose."""


class ConfigError(AdaptuneError, ValueError):
    """A config value is missing, of the wrong type or out of range."""


class DataError(AdaptuneError, ValueError):
    """The labelled data cannot be used as asked (missing column, too few examples, ...)."""


class ModelError(AdaptuneError, ValueError):
    """The pretrained model cannot be found, loaded or adapted to the task."""


class PlanError(AdaptuneError, ValueError):
    """A freeze plan does not match the model it is applied to."""


class TrackingError(AdaptuneError):
    """The MLflow store cannot hold what the files say it should (unreachable, deleted, or
    another store than the one the runs were logged to)."""
