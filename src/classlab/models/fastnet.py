"""``fastnet``: the airbench94 family of CIFAR networks, for time-to-accuracy on small machines.

Eight layers and 1.97M parameters reach 94% on CIFAR-10 in about ten epochs because nearly
every part of the network is chosen to make early training productive:

* a frozen first layer that *whitens* 2x2 patches (its filters are the eigenvectors of the patch
  covariance of training images, scaled to unit variance, and their negatives so a GELU after it
  loses no information). The network starts from decorrelated inputs instead of having to learn
  them; ``init_from_data`` computes it once from training images before the first step;
* three conv groups (conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU) with no residuals:
  pooling right after the first conv of a group makes the second conv 4x cheaper;
* conv filters whose first ``in_channels`` outputs start as identity (Dirac) maps, so the signal
  passes through all layers at initialisation as it would through a residual net;
* BatchNorm without a learned scale (the following conv can scale) and with a short memory
  (momentum 0.6 in airbench's convention, 0.4 in PyTorch's), because the weights move fast;
* a bias-free linear head whose logits are multiplied by 1/9, which acts like a lower
  temperature and keeps the early loss from saturating.

The whitening layer's bias trains only for the first ``whiten_bias_epochs`` epochs
(``set_epoch``): later it would keep shifting the input of every layer above it.

The training recipe that goes with the network (decoupled learning rates, label smoothing,
scheduled lookahead, flip + translate TTA) is ``configs/cifar10_fast.yaml``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from classlab.errors import ConfigError
from classlab.models.net import ClassifierNet
from classlab.models.registry import Preset, register_model

WHITEN_EPS = 5e-4  # added to the patch-covariance eigenvalues: keeps near-constant directions from blowing up
WHITEN_IMAGES = 5000  # training images whose patches estimate the 12x12 covariance (airbench's choice)


def _dirac_conv(n_in: int, n_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(n_in, n_out, 3, padding="same", bias=False)
    with torch.no_grad():
        # The first n_in filters copy their input channel: the layer starts close to the identity.
        nn.init.dirac_(conv.weight[: min(n_in, n_out)])
    return conv


def _batchnorm(channels: int, momentum: float) -> nn.BatchNorm2d:
    # ``momentum`` in airbench's convention (weight of the old running value); torch wants 1 minus it.
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=1.0 - momentum)
    bn.weight.requires_grad_(False)  # no learned scale: the next conv's weights can provide it
    return bn


class ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU, halving the resolution."""

    def __init__(self, n_in: int, n_out: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = _dirac_conv(n_in, n_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _batchnorm(n_out, bn_momentum)
        self.conv2 = _dirac_conv(n_out, n_out)
        self.norm2 = _batchnorm(n_out, bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class Whiten(nn.Module):
    """The frozen patch-whitening conv, with its (trainable) bias kept outside the convolution.

    A bias inside ``conv2d`` makes autograd run the convolution's backward kernel just to sum
    the output gradient; as a separate add its gradient is that sum and nothing more, and the
    frozen convolution needs no backward at all (its input is the image).
    """

    def __init__(self, n_in: int, n_out: int, kernel: int) -> None:
        super().__init__()
        # A random start until init_from_data replaces it, so a model built without data still trains.
        self.weight = nn.Parameter(torch.empty(n_out, n_in, kernel, kernel), requires_grad=False)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight)
        return y + self.bias.view(1, -1, 1, 1).to(y.dtype)


class FastNet(ClassifierNet):
    """ClassifierNet with a frozen patch-whitening stem, a scaled bias-free head and the two hooks."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: int,
        widths: Sequence[int],
        bn_momentum: float,
        logit_scale: float,
        whiten_kernel: int,
        whiten_bias_epochs: int,
    ) -> None:
        whiten_width = 2 * in_chans * whiten_kernel**2  # each eigen-filter and its negative
        stem = nn.Sequential(Whiten(in_chans, whiten_width, whiten_kernel), nn.GELU())
        groups, channels = [], whiten_width
        for width in widths:
            groups.append(ConvGroup(channels, width, bn_momentum))
            channels = width
        # Max over what is left (3x3 at 32 px): airbench's final MaxPool2d(3), for any input size.
        neck = nn.AdaptiveMaxPool2d(1)
        super().__init__(stem, nn.Sequential(*groups), neck, num_classes, in_chans=in_chans, image_size=image_size)
        self.head.fc = nn.Linear(self.num_features, num_classes, bias=False)
        self.logit_scale = float(logit_scale)
        self.whiten_kernel = whiten_kernel
        self.whiten_bias_epochs = whiten_bias_epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.logit_scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the stem's filters to whiten the ``k x k`` patches of ``images`` (normalised floats).

        Called once after the model is built, before the first step. The covariance is
        accumulated in float64 a chunk at a time, so 5000 images never need all their ~5M
        patches in memory at once.
        """
        conv = self.stem[0]
        images = images[:WHITEN_IMAGES].float()
        k, c = self.whiten_kernel, images.shape[1]
        if images.shape[-1] < k or images.shape[-2] < k or len(images) == 0:
            return
        dim = c * k * k
        cov = torch.zeros(dim, dim, dtype=torch.float64, device=images.device)
        count = 0
        for chunk in images.split(500):
            # (N, C, H', W', k, k) -> one row per patch, channels first as in the conv's weight layout
            patches = chunk.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, dim).double()
            cov += patches.T @ patches
            count += len(patches)
        cov /= count
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        order = eigenvalues.flip(0)
        filters = eigenvectors.T.flip(0) / torch.sqrt(order.clamp_min(0) + WHITEN_EPS)[:, None]
        filters = filters.reshape(dim, c, k, k).to(conv.weight.dtype)
        conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.device))

    def set_epoch(self, epoch: int) -> None:
        """Train the whitening bias only in the first epochs (called at every epoch start).

        Under DDP a parameter that stops needing gradients mid-run upsets the gradient reducer;
        set ``model.whiten_bias_epochs`` to 0 (never trained) or large (always) there.
        """
        self.stem[0].bias.requires_grad_(epoch < self.whiten_bias_epochs)


@register_model(
    "fastnet",
    presets={
        "airbench94": Preset({}, description="airbench94's widths 64/256/256 (1.97M params)"),
        "small": Preset({"widths": [32, 128, 128]}, description="a quarter of the FLOPs, for quick experiments"),
    },
    default_image_size=32,
    description="airbench94-style conv groups, patch-whitening stem (CIFAR speed runs)",
)
def build_fastnet(
    num_classes: int,
    in_chans: int,
    image_size: int,
    widths: Sequence[int] = (64, 256, 256),
    bn_momentum: float = 0.6,
    logit_scale: float = 1 / 9,
    whiten_kernel: int = 2,
    whiten_bias_epochs: int = 3,
) -> FastNet:
    """Three conv groups of ``widths`` on a whitening stem; see the module docstring for why each part."""
    widths = list(widths)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ConfigError(f"model.widths must be a list of positive integers (one per conv group): got {widths!r}")
    if not 0.0 <= float(bn_momentum) < 1.0:
        raise ConfigError(f"model.bn_momentum must be in [0, 1) (weight of the old running value): got {bn_momentum}")
    if isinstance(whiten_kernel, bool) or not isinstance(whiten_kernel, int) or not 1 <= whiten_kernel <= 5:
        raise ConfigError(f"model.whiten_kernel must be an integer 1..5: got {whiten_kernel!r}")
    if image_size < whiten_kernel * 2 ** len(widths):
        raise ValueError(f"{len(widths)} conv groups halve {image_size} px below one pixel")
    return FastNet(
        num_classes,
        in_chans,
        image_size,
        widths,
        float(bn_momentum),
        float(logit_scale),
        whiten_kernel,
        int(whiten_bias_epochs),
    )
