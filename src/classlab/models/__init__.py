"""Models: a registry of named families, all built in one shape (see ``net.py``).

Importing this package registers every family.
"""

from classlab.models import (  # noqa: F401  (registration)
    bottleneck,
    cnn,
    efficientnet,
    fastnet,
    mixer,
    mlp,
    residual_cnn,
    resnet,
    resnet_cifar,
)
from classlab.models.net import ClassifierNet
from classlab.models.registry import (
    ModelInfo,
    build_model,
    check_param_budget,
    count_flops,
    count_params,
    list_models,
    register_model,
    validate_model_spec,
)
from classlab.models.surgery import load_backbone_weights, read_weights

__all__ = [
    "ClassifierNet",
    "ModelInfo",
    "build_model",
    "check_param_budget",
    "count_flops",
    "count_params",
    "list_models",
    "load_backbone_weights",
    "read_weights",
    "register_model",
    "validate_model_spec",
]
