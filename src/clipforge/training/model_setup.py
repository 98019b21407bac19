"""The model ``clipforge train`` trains: built or loaded, given the objective's head, parts frozen as asked."""

from __future__ import annotations

import torch

from clipforge.checkpoints import load as load_checkpoint_model
from clipforge.errors import ConfigError
from clipforge.models import CLIP, create_model, get_model_config
from clipforge.training.config import TrainConfig
from clipforge.training.low_precision import cast_text_tower, text_tower_parameters


def build_model(config: TrainConfig, device: torch.device) -> CLIP:
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    head = None if config.objective == "contrastive" else config.objective
    if config.init_from:
        model = load_checkpoint_model(config.init_from, model=config.init_model, quick_gelu=config.init_quick_gelu)[0]
        if model.config.predictive_head != head:
            raise ConfigError(f"objective = \"{config.objective}\" but init_from {config.init_from} was trained "
                              f"{'with the ' + model.config.predictive_head + ' head' if model.config.predictive_head else 'contrastively'}; "
                              "fine-tune with the objective the checkpoint has, or start from model")
    else:
        model_config = get_model_config(config.model)
        model = create_model(model_config.replace(predictive_head=head) if head else model_config)
    model = model.float().train()
    if config.text_weights_dtype == "bf16":  # the paper's bf16 text tower, updated by stochastic rounding
        cast_text_tower(model, torch.bfloat16)
    if config.lock_image:
        model.visual.requires_grad_(False)
    if config.lock_text:
        for param in text_tower_parameters(model):
            param.requires_grad_(False)
    _freeze_unused(model, head)
    model.set_grad_checkpointing(config.grad_checkpointing)
    return model.to(device)


def _freeze_unused(model: CLIP, head: str | None) -> None:
    """A predictive objective never uses the temperature, and bag-of-words prediction not the text tower
    (caption_lm not its projection): frozen, so DDP does not wait for their gradients."""
    if head is None:
        return
    model.logit_scale.requires_grad_(False)
    unused = text_tower_parameters(model) if head == "bow_prediction" else [model.text_projection]
    for param in unused:
        param.requires_grad_(False)
