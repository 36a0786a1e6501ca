"""Feature extractors for FID/IS/KID/PRC, behind one registry (``EXTRACTORS``).

* ``mnist-cnn``: a small CNN digit classifier trained here, once, on the run's own training
  images (8x8 sklearn digits or 28x28 MNIST; inputs are resized to 28x28 inside the net).
  Its penultimate layer (64-d) feeds FID/KID/PRC, its logits feed IS and condition accuracy.
* ``inception-v3``: torch-fidelity's InceptionV3 from a local weights file (eval.inception_weights;
  no downloads). It has no head for the data's conditions: no condition accuracy.

torch-fidelity caches features and statistics by *extractor name*, ignoring weights, so the
name registered for a trained mnist-cnn carries the architecture version and a digest of
its weights, and the one for inception-v3 the sha256 of its weights file: new weights never
reuse stale reference statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm.auto import tqdm

# Bump when MnistCNN's architecture, preprocessing or training recipe changes.
MNIST_CNN_VERSION = "v1"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def as_uint8_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Validate uint8 [N,H,W,C] (C=1|3) or [N,H,W] (grayscale); return [N,H,W,C]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 pixels in 0..255, got dtype {images.dtype} (shape {images.shape})")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"{what}: expected shape [N,H,W,C] with N>0 and C in (1, 3), got {images.shape}")
    return images


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,C] numpy -> uint8 [N,C,H,W] tensor (no copy of the pixels' values)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------
class MnistCNN(nn.Module):
    """Digit classifier: uint8 [B,C,H,W] (any C, H, W) -> (features [B,feat_dim], logits [B,classes])."""

    INPUT_SIZE = 28

    def __init__(self, num_classes: int = 10, width: int = 16, feat_dim: int = 64):
        super().__init__()
        self.arch = {"num_classes": num_classes, "width": width, "feat_dim": feat_dim}
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 7 * 7, feat_dim)
        self.head = nn.Linear(feat_dim, num_classes)
        # Set after training so features have unit RMS on the train set: KID's cubic kernel
        # (x.y/d + 1)^3 then works on the same scale as with Inception features.
        self.register_buffer("feat_scale", torch.ones(()))

    @classmethod
    def preprocess(cls, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B,C,H,W] -> float [B,1,28,28] in [-1, 1]: gray, then one fixed size for every dataset."""
        x = x.float().mean(dim=1, keepdim=True) / 255.0
        if x.shape[-2:] != (cls.INPUT_SIZE, cls.INPUT_SIZE):
            x = F.interpolate(x, size=(cls.INPUT_SIZE, cls.INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x * 2.0 - 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(self.preprocess(x))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed float [B,1,28,28] -> (features, logits)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 14x14
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 7x7
        feats = F.relu(self.fc(h.flatten(1)))
        return feats * self.feat_scale, self.head(feats)


def train_mnist_cnn(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int = 10,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    shift: bool = True,
    progress: bool = True,
) -> MnistCNN:
    """Train MnistCNN on uint8 [N,H,W,C] images and int labels in [0, num_classes). Pure and seeded:
    the same inputs give the same weights (CPU), and the global RNG is left untouched."""
    images = as_uint8_images(images, "train images")
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"train labels: expected shape ({len(images)},), got {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(f"train labels: row {bad[0]} has label {labels[bad[0]]}, outside [0, {num_classes})")
    with single_threaded(), torch.random.fork_rng(devices=[]):
        return _train(images, labels, num_classes, epochs, batch_size, lr, seed, shift, progress)


@contextlib.contextmanager
def single_threaded(blas: bool = True):
    """Run torch (and, with blas, numpy's BLAS/OpenMP pools) on one thread; restore afterwards.

    A 60k-parameter CNN and KID's 100x100 kernels gain nothing from threads, while spinning
    OpenMP/OpenBLAS threads on a busy 2-core box cost 5-10x wall time (measured: one
    compute_metrics on 500 digits, 7.3 s -> 0.8 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1) if blas else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(n)


def _train(images, labels, num_classes, epochs, batch_size, lr, seed, shift, progress) -> MnistCNN:
    # Preprocess once: the resize is the same every epoch.
    x_all, y_all = MnistCNN.preprocess(to_nchw(images)), torch.as_tensor(labels, dtype=torch.long)
    torch.manual_seed(seed)  # inside fork_rng: seeds the weight init without touching the caller's RNG
    net = MnistCNN(num_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(images) // batch_size)
    # Cosine decay to 0: the last epochs settle the weights, so features do not hinge on the stop step.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    net.train()
    for _ in tqdm(range(epochs), desc="train mnist-cnn", unit="epoch", disable=None if progress else True):
        for idx in torch.randperm(len(images), generator=gen).split(batch_size):
            x = x_all[idx]
            if shift:  # up to 2 px at 28x28, so slightly off-centre generated digits are still read
                dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()
                x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net.embed(x)[1], y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        feats = torch.cat([net.embed(x)[0] for x in x_all.split(1024)])
        net.feat_scale.fill_(1.0 / feats.pow(2).mean().sqrt().clamp_min(1e-6))
    return net


def state_digest(net: nn.Module) -> str:
    """sha256 over the state dict's names and bytes: names the weights in cache keys."""
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_mnist_cnn(path: str | Path) -> MnistCNN:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("version") != MNIST_CNN_VERSION:
        raise ValueError(f"{path}: mnist-cnn version {blob.get('version')!r}, this code reads {MNIST_CNN_VERSION!r}")
    net = MnistCNN(**blob["arch"])
    net.load_state_dict(blob["state_dict"])
    return net.eval().requires_grad_(False)


class MnistCNNFeatures(FeatureExtractorBase):
    """torch-fidelity adapter: uint8 [B,3,H,W] -> ('penultimate', 'logits'); weights from
    ``feature_extractor_weights_path`` (torch-fidelity passes its kwargs to the constructor)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {name}: feature_extractor_weights_path is required")
        self.net = load_mnist_cnn(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "penultimate", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

    def forward(self, x):
        with single_threaded(blas=False):  # per batch: skip threadpoolctl's library scan
            feats, logits = self.net(x)
        out = {"penultimate": feats, "logits": logits}
        return tuple(out[k] for k in self.features_list)


# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Extractor:
    """A resolved, picklable extractor (Ray workers re-register it on use).

    fidelity_name: the torch-fidelity registry name (versioned; part of every cache key).
    cache_root: where torch-fidelity keeps features/statistics for this extractor.
    num_classes: classes of the logits head matching the data's labels (None: no such head).
    """

    kind: str
    fidelity_name: str
    weights_path: Path
    cache_root: Path
    num_classes: int | None

    def register(self) -> None:
        if self.fidelity_name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(self.fidelity_name, FEATURE_CLASSES[self.kind])

    def fidelity_kwargs(self) -> dict:
        self.register()
        return {"feature_extractor": self.fidelity_name, "feature_extractor_weights_path": str(self.weights_path)}

    def feature_layers(self) -> dict[str, str]:
        """metric ('isc','fid','kid','prc') -> the layer torch-fidelity reads for it."""
        self.register()
        cls = FEATURE_EXTRACTORS_REGISTRY[self.fidelity_name]
        return {m: cls.get_default_feature_layer_for_metric(m) for m in ("isc", "fid", "kid", "prc")}

    def classifier(self) -> MnistCNN:
        if self.num_classes is None:
            raise ValueError(f"extractor {self.kind} has no classifier head for the data's labels; use mnist-cnn")
        return load_mnist_cnn(self.weights_path)


def _data_digest(images: np.ndarray, labels: np.ndarray, **recipe) -> str:
    h = hashlib.sha256(repr((MNIST_CNN_VERSION, images.shape, sorted(recipe.items()))).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:12]


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _load_mnist_cnn_extractor(
    cache_dir: Path, *, train_images=None, train_labels=None, epochs=12, seed=0, progress=True, **_
) -> Extractor:
    """Train once per (version, training data, recipe) under cache_dir/mnist-cnn-<version>-<digest>/."""
    if train_images is None or train_labels is None:
        raise ValueError("extractor mnist-cnn needs train_images and train_labels (the demo's train split)")
    images = as_uint8_images(train_images, "train images")
    digest = _data_digest(images, train_labels, epochs=epochs, seed=seed)
    path = Path(cache_dir) / f"mnist-cnn-{MNIST_CNN_VERSION}-{digest}" / "model.pt"
    if not path.exists():
        net = train_mnist_cnn(images, train_labels, epochs=epochs, seed=seed, progress=progress)
        blob = {"version": MNIST_CNN_VERSION, "arch": net.arch, "state_dict": net.state_dict(),
                "train": {"n": len(images), "image_shape": list(images.shape[1:]), "epochs": epochs, "seed": seed}}
        _atomic_torch_save(blob, path)
    net = load_mnist_cnn(path)
    name = f"mnist-cnn-{MNIST_CNN_VERSION}-{state_digest(net)[:12]}"
    return Extractor("mnist-cnn", name, path, Path(cache_dir) / "fidelity_cache", net.arch["num_classes"])


def inception_weights_path(inception_weights: str | Path | None = None) -> Path:
    """The file used for inception-v3: the explicit path, else $TORCH_HOME/hub/checkpoints/<file>."""
    if inception_weights:
        return Path(inception_weights).expanduser().resolve()
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_inception_extractor(cache_dir: Path, *, inception_weights=None, **_) -> Extractor:
    """torch-fidelity's InceptionV3 on the weights file, registered as inception-v3-<sha256 of the file>."""
    path = inception_weights_path(inception_weights)
    if not path.is_file():
        given = f"eval.inception_weights={inception_weights}" if inception_weights else \
            f"eval.inception_weights is unset and the default {path}"
        raise FileNotFoundError(
            f"inception-v3 weights: {given}: no such file. Nothing is downloaded at run time: fetch {INCEPTION_URL} "
            f"elsewhere (torch-fidelity's FeatureExtractorInceptionV3 state dict) and set eval.inception_weights "
            f"to its local path."
        )
    name = f"inception-v3-{file_sha256(path)[:12]}"
    return Extractor("inception-v3", name, path, Path(cache_dir) / "fidelity_cache", None)


# kind -> the torch-fidelity class an Extractor registers under its fidelity_name
FEATURE_CLASSES = {"mnist-cnn": MnistCNNFeatures, "inception-v3": FeatureExtractorInceptionV3}


# kind -> loader(cache_dir, **options) -> Extractor; the keys are eval.extractor's choices.
EXTRACTORS: dict[str, Callable[..., Extractor]] = {
    "mnist-cnn": _load_mnist_cnn_extractor,
    "inception-v3": _load_inception_extractor,
}


def load_extractor(kind: str, cache_dir: str | Path, **options) -> Extractor:
    """Resolve an extractor by registry name. Options: train_images/train_labels/epochs/seed/progress
    (mnist-cnn), inception_weights (inception-v3)."""
    if kind not in EXTRACTORS:
        raise ValueError(f"unknown extractor {kind!r}; available: {', '.join(EXTRACTORS)}")
    return EXTRACTORS[kind](Path(cache_dir), **options)


def extractor_from_config(cfg, train_images=None, train_labels=None, progress: bool = True) -> Extractor:
    """The run's extractor: cfg.eval.extractor, cached under cfg.root/extractors."""
    return load_extractor(
        cfg.eval.extractor,
        cfg.root / "extractors",
        train_images=train_images,
        train_labels=train_labels,
        epochs=cfg.eval.classifier_epochs,
        inception_weights=cfg.eval.inception_weights,
        progress=progress,
    )
