"""The research wing's evaluation: cluster consistency, tissue agreement, probe and survival against baselines
(``latentharmonize evaluate``)."""
from .evaluate import add_arguments, evaluate, run

__all__ = ["add_arguments", "evaluate", "run"]
