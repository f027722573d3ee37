"""The research wing's trainer: encoder, latent rotation and tissue clusters into a model bundle
(``latentharmonize train``); one concept per file (docs/training.md#code)."""
from .command import add_arguments, run
from .config import TrainConfig
from .trainer import train

__all__ = ["TrainConfig", "add_arguments", "run", "train"]
