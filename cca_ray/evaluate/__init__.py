"""Stage `evaluate`: draw samples, score them with torch-fidelity, write tables and plots.

    sampling.py    class-balanced conditions, per-image seeds, sampling locally or over Ray
    extractors.py  feature extractors (mnist-cnn trained here; Inception-v3 from a local file)
    fidelity.py    FID / IS / KID / precision-recall / condition accuracy through torch-fidelity
    reference_stats.py  FID against precomputed statistics (ADM's ImageNet npz); bicubic resize for scoring
    job.py         what a stage run does: the eval setup, one model at several guidance scales
    report.py      results tables (markdown, CSV) and the trade-off plot
"""
