"""Training: ``train_and_evaluate(config, workdir)`` and the experiment dataclasses."""

from lora_jax.train.config import (
    AdapterConfig,
    BaseConfig,
    DataConfig,
    Experiment,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from lora_jax.train.steps import make_train_step, token_loss
from lora_jax.train.trainer import train_and_evaluate

__all__ = ["make_train_step", "token_loss","AdapterConfig", "BaseConfig", "DataConfig", "Experiment", "ModelConfig",
           "OptimConfig", "TrainConfig", "from_dict", "to_dict", "train_and_evaluate"]
