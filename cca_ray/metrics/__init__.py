"""Sample-quality metrics: feature extractors (registry) and torch-fidelity scoring.

    ext = extractor_from_config(cfg, train_images, train_labels)   # mnist-cnn trains once, cached
    ref = prepare_reference(holdout_images, ext, dataset="holdout")  # cached per (images, extractor)
    m = compute_metrics(samples, ref, ext, labels=asked_labels)      # fid, isc_*, kid_*, precision, recall, accuracy, n
    p = fid_proxy(samples, ref, ext, num_samples=cfg.eval.proxy_num_samples)
"""

from cca_ray.metrics.extractors import (
    EXTRACTORS,
    MNIST_CNN_VERSION,
    Extractor,
    MnistCNN,
    extractor_from_config,
    inception_weights_path,
    load_extractor,
    train_mnist_cnn,
)
from cca_ray.metrics.fidelity import (
    ALL_METRICS,
    ImageArrayDataset,
    ReferenceSet,
    check_comparable,
    compute_metrics,
    condition_accuracy,
    fid_proxy,
    predict_labels,
    prepare_reference,
)

__all__ = [
    "ALL_METRICS", "EXTRACTORS", "MNIST_CNN_VERSION", "Extractor", "ImageArrayDataset", "MnistCNN", "ReferenceSet",
    "check_comparable", "compute_metrics", "condition_accuracy", "extractor_from_config", "fid_proxy",
    "inception_weights_path", "load_extractor", "predict_labels", "prepare_reference", "train_mnist_cnn",
]
