"""Contrastive pre-training: config, objective, loop, checkpoints."""

from clipforge.training.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config", "train"]


def train(config: TrainConfig) -> dict:
    """Run or resume training (see clipforge.training.loop); imported lazily to keep `import clipforge` light."""
    from clipforge.training.loop import train as _train

    return _train(config)
