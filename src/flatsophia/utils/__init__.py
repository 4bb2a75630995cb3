"""Helpers of the training entry points: instantiators, config printing, the task wrapper, resolvers.

Importing this package registers the project's OmegaConf resolvers (see :mod:`.resolvers`).
"""

from .instantiators import instantiate_callbacks, instantiate_loggers
from .logging_utils import log_hyperparameters
from .resolvers import register_resolvers
from .rich_utils import print_config_tree
from .utils import extras, finish_wandb, get_metric_value, metric_sweeper, task_wrapper

register_resolvers()

__all__ = [
    "extras",
    "finish_wandb",
    "get_metric_value",
    "instantiate_callbacks",
    "instantiate_loggers",
    "log_hyperparameters",
    "metric_sweeper",
    "print_config_tree",
    "register_resolvers",
    "task_wrapper",
]
