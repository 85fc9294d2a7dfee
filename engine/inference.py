"""The engine's public face: ``load_model()`` → ``SimilarityModel`` with ``embed``, ``score``, ``explain``.

Images may be paths, bytes, PIL images or arrays. The frozen backbone runs under bf16 autocast with
channels_last where the config allows it (2–4× faster on CPUs with AMX/AVX-512 BF16; on a GPU float16
where it lacks bf16); the trained layers and all gradients for Grad-CAM run in float32.

A model whose checkpoint has a description codec (``engine.nn.compact``: ``descriptions.safetensors`` +
``descriptions.json``) stores each image's head description as a few KiB of codes rather than its
projections; without one, as float16 projections.

The model runs on one device (``load_model(device=...)``: the CPU or a CUDA GPU). Whatever it computes
there comes back to the CPU as numpy arrays or CPU tensors (feature maps included; those computed from
pixels come back where the pixels were), so callers never see the device; the methods that go on from
images (``encode``, ``score``, ``explain``) keep their intermediates on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, load_file, save, save_file
from torch import Tensor

from engine.nn.backbones import backbone_spec, create_backbone
from engine.explain.concepts import attach_concepts
from engine.config import BACKBONE_BATCH, Device, ModelConfig
from engine.explain.correspondences import attach_correspondences
from engine.explain.decision import pair_verification
from engine.explain.pairs import PairExplanation, explain_projections
from engine.explain.masking import DEFAULT_AREA, DEFAULT_FILL, effects_from_tensors, fill_pixels
from engine.explain.coalitions import COALITION_METHODS
from engine.images import ImageSource, image_size, load_pixels, to_tensor
from engine.nn.compact import CODEC_CONFIG_FILE, DescriptionCodec, as_projections, projection_norms
from engine.nn.siamese import MatchNet, SiameseNet, build_net

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# The layout of descriptions packed as float16 projections (``pack_description``).
PROJECTIONS_FORMAT = "projections-1"


class SimilarityModel:
    """A Siamese network ready for inference, with its config, decision threshold and, for the whymatch
    preset, optionally the codec its stored descriptions are packed with (``codec``)."""

    def __init__(self, net: SiameseNet, config: ModelConfig, batch_size: int = BACKBONE_BATCH,
                 device: torch.device | str | None = None, codec: DescriptionCodec | None = None) -> None:
        # None: where the net's parameters already are.
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.net = net.to(self.device).eval()
        self.config = config
        if codec is not None:
            check_codec(net, codec)
        self.codec = codec
        self.batch_size = batch_size
        spec = backbone_spec(config.backbone)
        self.mean, self.std = spec.mean, spec.std
        if config.bf16:
            self.net.backbone.to(memory_format=torch.channels_last)

    cam_layer = "backbone.cam"

    @property
    def description_format(self) -> str:
        """Names the layout of packed descriptions (the codec's, codebooks included); stores keyed by a
        model fingerprint include it, so descriptions of another layout are recomputed, never misread."""
        return self.codec.format if self.codec is not None else PROJECTIONS_FORMAT

    @property
    def recodable_format(self) -> str | None:
        """The description format that ``recode_descriptions`` turns into this model's (descriptions by
        the same weights as float16 projections), or None where none is: a store can then convert its
        items without decoding an image."""
        return PROJECTIONS_FORMAT if self.codec is not None else None

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @property
    def duplicate_threshold(self) -> float:
        """Where duplicate detection over a whole catalogue draws the line (``ModelConfig``)."""
        return self.config.duplicate_threshold if self.config.duplicate_threshold is not None else self.config.threshold

    @property
    def metric(self) -> str:
        return self.config.metric

    def load(self, images: Sequence[ImageSource]) -> list[np.ndarray]:
        """Decode images as the model sees them: H×W×3 uint8 RGB arrays, at reduced size where the
        format allows (``engine.images.load_pixels``). Passing these back to any model method decodes
        nothing again."""
        return [load_pixels(img, target_size=self.config.input_size) for img in images]

    def pixels(self, images: Sequence[ImageSource]) -> Tensor:
        """The normalised input batch of images (on the CPU)."""
        return to_tensor(self.load(images), self.config.input_size, self.mean, self.std)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.config.bf16:
            return contextlib.nullcontext()
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def _on_device(self, tensor: Tensor) -> Tensor:
        """``tensor`` where the model runs (itself when it is there already)."""
        return tensor.to(self.device)

    @torch.inference_mode()
    def fmaps_from_pixels(self, pixels: Tensor) -> Tensor:
        """Grad-CAM-layer activations (float32) of a preprocessed batch, on the pixels' device (the CPU
        for ``pixels()``)."""
        return self._fmaps(pixels).to(pixels.device)

    @torch.inference_mode()
    def frozen_features(self, pixels: Tensor) -> Tensor:
        """The frozen backbone blocks' output (float32) of a preprocessed batch, on the pixels' device:
        what training caches, since only the blocks after it (``config.tuned_blocks``) and the head learn."""
        return self._run(self.net.backbone_parts[0], pixels).to(pixels.device)

    @torch.inference_mode()
    def _fmaps(self, pixels: Tensor) -> Tensor:
        """``fmaps_from_pixels`` left on the device, for the methods that go on with them."""
        return self._run(self.net.backbone.features, pixels)

    def _run(self, layers: Callable[[Tensor], Tensor], pixels: Tensor) -> Tensor:
        pixels = self._on_device(pixels)
        if self.config.bf16:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = layers(pixels)
        return out.float().contiguous()

    def pixel_batches(self, images: Sequence[ImageSource]) -> Iterator[Tensor]:
        """Preprocessed batches, decoded one batch at a time in this thread. Decoding ahead in a
        second thread gains nothing on 2 cores, where torch's OpenMP workers already use both
        (interleaved medians over 15 rounds: 0.77× against 0.78× of the bare backbone's speed)."""
        for chunk in _chunks(images, self.batch_size):
            yield self.pixels(chunk)

    def feature_maps(self, images: Sequence[ImageSource]) -> Tensor:
        """Backbone feature maps of images (on the CPU), batched."""
        return self._feature_maps(images).cpu()

    def _feature_maps(self, images: Sequence[ImageSource]) -> Tensor:
        if not len(images):
            raise ValueError("feature_maps needs at least one image")
        return torch.cat([self._fmaps(batch) for batch in self.pixel_batches(images)])

    @torch.inference_mode()
    def embed_fmaps(self, fmaps: Tensor) -> np.ndarray:
        return self.net.embed_fmap(fmaps).cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def describe_fmaps(self, fmaps: Tensor) -> list[bytes]:
        """Each image's head description (what ``score`` compares) packed as bytes, so a stored item is
        re-scored and explained against a query without decoding it or running the backbone again: its
        signature through the codec where the model has one, else its projections as float16."""
        if self.codec is not None:
            return self._encode_projections(self.net.project(fmaps))
        # float16 before leaving the device: half the bytes to copy, and what packing stores anyway.
        parts = tuple(part.to(torch.float16).cpu() for part in self.net.describe(fmaps))
        return [pack_description(tuple(part[i] for part in parts)) for i in range(len(fmaps))]

    @torch.inference_mode()
    def recode_descriptions(self, packed: Sequence[bytes]) -> list[bytes]:
        """This model's compact descriptions of images whose descriptions were packed as float16 projections
        (``recodable_format``) by the same weights: their signature, encoded, with no image decoded. Equal
        to ``describe_fmaps`` up to the projections' float16 rounding."""
        if self.codec is None:
            raise ValueError("only a model with a description codec recodes descriptions")
        if not len(packed):
            return []
        (projections,) = unpack_descriptions(packed)
        return self._encode_projections(self._on_device(projections))

    def _encode_projections(self, projections: Tensor) -> list[bytes]:
        """The codec's packed descriptions of B images' projections: their signature and its norms."""
        signature = self.net.signature_from_projections(projections)
        norms = projection_norms(self.net, projections)
        embedding, cells, pooled, cell_norms = (part.float().cpu() for part in (*signature, *norms))
        return self.codec.encode(embedding, cells, tuple(projections.shape[2:]), (pooled, cell_norms))

    def _signatures(self, packed: Sequence[bytes]) -> tuple[Tensor, ...]:
        """The signatures (on the head's device) of packed descriptions, as the head compares them."""
        if self.codec is not None:
            signature, _ = self.codec.decode(packed)
            return tuple(self._on_device(part).to(self.net.head_dtype) for part in signature)
        (projections,) = unpack_descriptions(packed)
        return self.net.signature_from_projections(projections)

    def _projections(self, packed: Sequence[bytes]) -> Tensor:
        """Projection-shaped tensors of packed descriptions, for the explanation paths that take projections:
        the stored ones, or those of the decoded signature (``engine.nn.compact.as_projections``)."""
        if self.codec is not None:
            signature, norms, grid = self.codec.decode_with_norms(packed)
            return as_projections(self.net, tuple(self._on_device(part) for part in signature), grid,
                                  tuple(self._on_device(part) for part in norms))
        return unpack_descriptions(packed)[0]

    def encode(self, images: Sequence[ImageSource]) -> tuple[np.ndarray, list[bytes]]:
        """Embeddings (as ``embed``) and packed head descriptions (as ``describe_fmaps``) in one backbone pass."""
        vectors, packed = [], []
        for batch in self.pixel_batches(images):
            fmaps = self._fmaps(batch)
            vectors.append(self.embed_fmaps(fmaps))
            packed.extend(self.describe_fmaps(fmaps))
        return (np.concatenate(vectors) if vectors else np.zeros((0, self.config.embed_dim), np.float32)), packed

    @torch.inference_mode()
    def score_described(self, packed_a: Sequence[bytes], packed_b: Sequence[bytes]) -> np.ndarray:
        """(n,) head similarities of pairs of packed descriptions (from ``describe_fmaps``/``encode``)."""
        if len(packed_a) != len(packed_b):
            raise ValueError(f"score_described needs as many descriptions in a as in b ({len(packed_a)} != {len(packed_b)})")
        if not len(packed_a):
            return np.zeros(0, np.float32)
        # Each distinct image is unpacked (or decoded) and turned into its signature once (a query meets
        # many candidates, a dedup item many neighbours), then pairs index into those.
        distinct: dict[bytes, int] = {}
        rows_a = [distinct.setdefault(bytes(blob), len(distinct)) for blob in packed_a]
        rows_b = [distinct.setdefault(bytes(blob), len(distinct)) for blob in packed_b]
        signature = self._signatures(list(distinct))
        return self.net.score_pairs(signature, rows_a, signature, rows_b).cpu().numpy().astype(np.float32)

    def embed(self, images: Sequence[ImageSource]) -> np.ndarray:
        """(n, d) float32 embeddings (unit length for the whymatch preset), as stored in the index."""
        parts = [self.embed_fmaps(self._fmaps(batch)) for batch in self.pixel_batches(images)]
        return np.concatenate(parts) if parts else np.zeros((0, self.config.embed_dim), np.float32)

    @torch.inference_mode()
    def score_fmaps(self, fmaps_a: Tensor, fmaps_b: Tensor) -> np.ndarray:
        return self.net.score_fmaps(fmaps_a, fmaps_b).cpu().numpy().astype(np.float32)

    def score(self, images_a: Sequence[ImageSource], images_b: Sequence[ImageSource]) -> np.ndarray:
        """(n,) head similarities in (0, 1) of pairs (images_a[i], images_b[i])."""
        if len(images_a) != len(images_b):
            raise ValueError(f"score needs as many images in a as in b ({len(images_a)} != {len(images_b)})")
        parts = [self.score_fmaps(self._feature_maps(a), self._feature_maps(b))
                 for a, b in zip(_chunks(images_a, self.batch_size), _chunks(images_b, self.batch_size))]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def explain(self, image_a: ImageSource, images_b: Sequence[ImageSource] | ImageSource, method: str = "gradcam",
                *, effects: bool = False, correspondences: bool = False, concepts: bool = False,
                sizes: Sequence[tuple[int, int]] | None = None,
                verifications: Sequence[dict | None] | None = None) -> list[PairExplanation]:
        """Explain image a against each of images_b: one batched forward + backward for all pairs.

        ``effects=True`` also fills ``explanation.effects`` (see ``add_effects``), reusing the decoded
        pixels and feature maps; without it no pixels are kept and nothing else runs.
        ``correspondences`` / ``concepts`` also fill those fields (see ``explain_feature_maps``); boxes
        are in the pixels of the original images, whose (width, height) are read from the sources
        unless ``sizes`` gives them (needed when the images are passed already decoded at reduced size).
        ``verifications`` (one per image b, or None: ``engine.explain.decision``) take part in the decision.
        """
        if not isinstance(images_b, (list, tuple)):
            images_b = [images_b]
        details = {"correspondences": correspondences, "concepts": concepts, "verifications": verifications,
                   "sizes": (sizes or [image_size(image) for image in (image_a, *images_b)]) if correspondences else None}
        if not effects and method not in COALITION_METHODS:
            fmaps = self._feature_maps([image_a, *images_b])
            return self.explain_feature_maps(fmaps[:1], fmaps[1:], method, **details)
        batches = [self._on_device(batch) for batch in self.pixel_batches([image_a, *images_b])]
        pixels = torch.cat(batches)
        fmaps = torch.cat([self._fmaps(batch) for batch in batches])
        if method in COALITION_METHODS:
            # A coalition method removes a cell as the blurred image has it: one more backbone pass per image.
            blurred = torch.cat([self._fmaps(fill_pixels(batch)) for batch in batches])
            details["removed_fmaps"] = (blurred[:1], blurred[1:])
        explanations = self.explain_feature_maps(fmaps[:1], fmaps[1:], method, **details)
        if effects:
            effects_from_tensors(self, pixels[:1], fmaps[:1], pixels[1:], fmaps[1:], explanations)
        return explanations

    def compare(self, image_a: ImageSource, image_b: ImageSource, *, method: str = "gradcam", effects: bool = True,
                correspondences: bool = True, concepts: bool = True, verify: bool = True,
                sizes: tuple[tuple[int, int], tuple[int, int]] | None = None, figure: str | Path | None = None,
                titles: tuple[str, str] = ("image A", "image B")) -> PairExplanation:
        """Score one pair and say why, with everything the engine can tell of it unless told otherwise: the
        geometric verification, the four maps, the measured effects, the corresponding regions and the
        concepts (``explain``).

        ``verify`` (~160 ms on 2 cores: SIFT on both images, a tried mirrored, and a homography fit;
        ``engine.explain.decision``) fills ``explanation.verification``, and a verified pair is a match
        whatever its similarity (``explanation.decided_by`` says which evidence decided). It reads the
        images as given (a file or bytes at up to 512 px, however small the model's input), so pass the
        sources rather than copies decoded at reduced size where you can.
        Correspondence boxes and inlier lines are in the original images' pixels, whose (width, height) are
        read from the sources unless ``sizes`` gives them (images passed already decoded at reduced size).
        ``figure`` also writes the pair figure there (``engine.explain.figures.pair_figure``, ``titles``
        over the two images), drawn from the pixels decoded once for both."""
        if (correspondences or verify) and sizes is None:
            sizes = (image_size(image_a), image_size(image_b))
        verification = pair_verification(image_a, image_b, sizes) if verify else None
        pictures = self.load([image_a, image_b])
        explanation = self.explain(pictures[0], [pictures[1]], method, effects=effects, correspondences=correspondences,
                                   concepts=concepts, sizes=sizes, verifications=[verification])[0]
        if figure is not None:
            from engine.explain.figures import pair_figure  # defers matplotlib: only figures need it

            pair_figure(pictures[0], pictures[1], explanation, figure, titles=titles, sizes=sizes)
        return explanation

    def explain_feature_maps(self, fmap_a: Tensor, fmaps_b: Tensor, method: str = "gradcam", *, correspondences: bool = False,
                             concepts: bool = False, sizes: Sequence[tuple[int, int]] | None = None,
                             verifications: Sequence[dict | None] | None = None,
                             removed_fmaps: tuple[Tensor, Tensor] | None = None) -> list[PairExplanation]:
        """Explain from feature maps already computed (e.g. for re-scoring): only the head runs,
        one forward and one backward pass for all pairs.

        ``correspondences=True`` also fills ``explanation.correspondences`` (``engine.explain.correspondences``):
        boxes in the pixels of the original images, whose (width, height) ``sizes`` lists, image a
        first (``engine.images.image_size``). ``concepts=True`` fills ``explanation.concepts``
        (``engine.explain.concepts``). Both work from the feature maps alone (milliseconds per pair).
        ``verifications``: one per image b (or None where none was run; ``engine.explain.decision``), part
        of each decision and of its explanation. ``removed_fmaps`` (those of the blurred images a and b) are
        how the coalition methods remove a cell; without them, by the image's mean cell
        (``engine.explain.coalitions``).
        """
        with torch.no_grad():
            proj_a, projs_b = self.net.project(fmap_a), self.net.project(fmaps_b)
            removed = None if removed_fmaps is None else tuple(self.net.project(f) for f in removed_fmaps)
        explanations = self._explain_projections(proj_a, projs_b, method, correspondences, sizes, verifications, removed)
        if concepts:
            attach_concepts(self.net.backbone, explanations, fmap_a, fmaps_b)
        return explanations

    def explain_described(self, packed_a: bytes, packed_b: Sequence[bytes], method: str = "gradcam", *,
                          correspondences: bool = False, sizes: Sequence[tuple[int, int]] | None = None,
                          verifications: Sequence[dict | None] | None = None) -> list[PairExplanation]:
        """Explain from packed descriptions (``describe_fmaps`` / ``encode``, as the index stores them):
        no image is decoded and no backbone runs. From float16 projections the maps are exactly Grad-CAM
        of the backbone's layer. From a codec's compact descriptions, the projections are rebuilt from
        the decoded signature and its stored norms (``as_projections``): the scores, cell contributions
        and correspondences are exact for the decoded descriptors (those search and dedup score), and the
        maps are Grad-CAM of those projections, whose local term is the stored projections' up to
        quantisation but whose global term is the same in every cell (its per-cell part is not stored).
        Concepts and effects need the feature maps or pixels (``explain_feature_maps``, ``add_effects``);
        ``verifications`` as there."""
        if not len(packed_b):
            raise ValueError("explain_described needs at least one description b")
        proj_a, projs_b = self._projections([packed_a]), self._projections(packed_b)
        return self._explain_projections(proj_a, projs_b, method, correspondences, sizes, verifications)

    def _explain_projections(self, proj_a: Tensor, projs_b: Tensor, method: str, correspondences: bool,
                             sizes: Sequence[tuple[int, int]] | None,
                             verifications: Sequence[dict | None] | None = None,
                             removed: tuple[Tensor, Tensor] | None = None) -> list[PairExplanation]:
        proj_a, projs_b = self._on_device(proj_a), self._on_device(projs_b)
        explanations = explain_projections(self.net, proj_a, projs_b, self.threshold, method, verifications, removed)
        if correspondences:
            if sizes is None or len(sizes) != 1 + len(projs_b):
                raise ValueError("correspondences need the (width, height) of image a and of each image b (sizes)")
            attach_correspondences(self.net, explanations, proj_a, projs_b, sizes[0], sizes[1:])
        return explanations

    def add_effects(self, image_a: ImageSource, images_b: Sequence[ImageSource], explanations: Sequence[PairExplanation], *,
                    fmap_a: Tensor | None = None, fmaps_b: Tensor | None = None, fill: str = DEFAULT_FILL,
                    area: float = DEFAULT_AREA) -> list[PairExplanation]:
        """Quantify explanations already made (e.g. by search): for each of the four maps, the
        similarity once its top ``area`` of its image is filled (``fill``: blur or mean), stored in
        ``explanation.effects``. Feature maps the caller holds are reused; the masked variants share
        batched backbone passes (``batch_size`` images each)."""
        if len(images_b) != len(explanations):
            raise ValueError(f"add_effects needs one explanation per image b ({len(explanations)} != {len(images_b)})")
        pixels = self._on_device(self.pixels([image_a, *images_b]))
        fmap_a = self._fmaps(pixels[:1]) if fmap_a is None else self._on_device(fmap_a)
        if fmaps_b is None:
            fmaps_b = torch.cat([self._fmaps(batch) for batch in pixels[1:].split(self.batch_size)])
        else:
            fmaps_b = self._on_device(fmaps_b)
        effects_from_tensors(self, pixels[:1], fmap_a, pixels[1:], fmaps_b, explanations, fill=fill, area=area)
        return list(explanations)

    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` (trained layers only), ``config.json`` and the codec, if any."""
        directory = save_checkpoint(self.net, self.config, directory)
        if self.codec is not None:
            self.codec.save(directory)
        return directory


def pack_description(parts: tuple[Tensor, ...]) -> bytes:
    """One image's description tensors as float16 safetensors bytes (~150 KB for the default model:
    196 cells × 384 projections)."""
    return save({str(n): part.detach().to(torch.float16).cpu().contiguous() for n, part in enumerate(parts)})


def unpack_descriptions(blobs: Sequence[bytes]) -> tuple[Tensor, ...]:
    """Packed descriptions of n images → their batch-first float32 tensors (``SiameseNet.describe``'s layout)."""
    loaded = [load(bytes(blob)) for blob in blobs]
    return tuple(torch.stack([parts[str(n)] for parts in loaded]).float() for n in range(len(loaded[0])))


def check_codec(net: SiameseNet, codec: DescriptionCodec) -> None:
    """Refuse a codec that does not fit the net: it stores the whymatch preset's signature."""
    if not isinstance(net, MatchNet):
        raise ValueError(f"a description codec stores the whymatch preset's signature, not {type(net).__name__}'s")
    if (codec.embed_dim, codec.cell_dim) != (net.config.embed_dim, net.config.local_dim):
        raise ValueError(f"the codec stores {codec.embed_dim}-d embeddings and {codec.cell_dim}-d cells; the model has "
                         f"{net.config.embed_dim}-d and {net.config.local_dim}-d")


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def save_checkpoint(net: SiameseNet, config: ModelConfig, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.trained_state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    config.to_json(directory / CONFIG_FILE)
    return directory


def resolve_device(device: Device) -> torch.device:
    """The torch device a ``ModelSettings.device`` names: ``auto`` is CUDA when torch can use a GPU,
    else the CPU; ``cuda`` without one is an error rather than a silent fall back to the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose from auto, cpu, cuda (WHYMATCH_DEVICE)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("WHYMATCH_DEVICE=cuda, but torch finds no usable CUDA GPU here (a CPU-only torch build, "
                         "no driver or no device); set WHYMATCH_DEVICE=cpu or auto")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_model(config: ModelConfig, batch_size: int = BACKBONE_BATCH, device: Device = "cpu",
                codec: DescriptionCodec | None = None) -> SimilarityModel:
    """A model with freshly initialised trained layers (the start of training), on ``device`` (``resolve_device``),
    storing its descriptions with ``codec`` where one is given."""
    where = resolve_device(device)
    backbone = create_backbone(config.backbone, config.backbone_weights)
    return SimilarityModel(build_net(config, backbone), config, batch_size, where, codec)


def load_model(path: str | Path | None = None, *, threads: int = 0, batch_size: int = BACKBONE_BATCH,
               device: Device = "cpu") -> SimilarityModel:
    """Load a checkpoint directory (``config.json`` + ``model.safetensors``, and its description codec where
    ``descriptions.json`` is there); the shipped model by default. ``device``: where it runs
    (``resolve_device``). The CPU unless asked, so that a script or test that loads a model measures what
    it says; the entry points pass ``ModelSettings.device`` (``auto``)."""
    directory = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if directory.is_file():
        directory = directory.parent
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no model at {directory}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    if threads > 0:
        torch.set_num_threads(threads)
    config = ModelConfig.from_json(config_path)
    codec = DescriptionCodec.load(directory) if (directory / CODEC_CONFIG_FILE).is_file() else None
    model = build_model(config, batch_size, device, codec)
    model.net.load_trained_state_dict(load_file(str(weights_path)))
    return model
