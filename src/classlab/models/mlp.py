"""A plain multilayer perceptron on flattened pixels: the baseline every other family must beat."""

from __future__ import annotations

from torch import nn

from classlab.errors import ConfigError
from classlab.models.net import FLAT, ClassifierNet
from classlab.models.registry import register_model

# torch's default negative slope: the model-template project's normal_MLP names only 'leaky_relu'.
LEAKY_SLOPE = 0.01


def _block(n_in: int, n_out: int, batchnorm: bool, dropout: float, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, n_out, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(n_out))
    layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True) if activation == "leaky_relu" else nn.ReLU(inplace=True))
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


@register_model("mlp", default_image_size=32, description="multilayer perceptron on flattened pixels")
def build_mlp(
    num_classes: int,
    in_chans: int,
    image_size: int,
    layers: list[int] | tuple[int, ...] = (512, 256),
    dropout: float = 0.0,
    batchnorm: bool = False,
    activation: str = "relu",
) -> ClassifierNet:
    """Each hidden width is one block, so ``truncate_at`` counts hidden layers.

    ``activation: leaky_relu`` (slope 0.01, torch's default) is the template's
    ``mid_activation_func='leaky_relu'``; ``batchnorm: false`` its ``batch_normalization_use=False``.
    """
    if activation not in ("relu", "leaky_relu"):
        raise ConfigError(f"model.activation must be relu or leaky_relu: got {activation!r}")
    widths = list(layers)
    if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ConfigError(f"model.layers for mlp must be a list of positive integers: got {layers!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1): got {dropout!r}")
    n_in = in_chans * image_size * image_size
    blocks = []
    for w in widths:
        blocks.append(_block(n_in, w, bool(batchnorm), float(dropout), activation))
        n_in = w
    return ClassifierNet(
        nn.Flatten(), nn.Sequential(*blocks), None, num_classes, layout=FLAT, in_chans=in_chans, image_size=image_size
    )
