"""Stage `tune`, the main job: CFG baseline, the ASHA sweep over lam/beta, baselines, results.

    sweep.py   the search space, one Tune trial = one Ray Train run reporting the FID proxy, ASHA
    job.py     the main job end to end (`python -m cca_ray.tune`), every step cached under the workdir
"""
