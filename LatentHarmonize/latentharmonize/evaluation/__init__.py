"""The research wing's evaluation: cluster consistency, tissue agreement, probe and survival against baselines
(``latentharmonize evaluate``)."""
from .command import add_arguments, run
from .evaluate import evaluate

__all__ = ["add_arguments", "evaluate", "run"]
