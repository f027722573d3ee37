"""The research wing's trainer: encoder, latent rotation and tissue clusters into a model bundle
(``latentharmonize train``)."""
from .trainer import TrainConfig, add_arguments, run, train

__all__ = ["TrainConfig", "add_arguments", "run", "train"]
