"""Search spaces for `python -m cca_ray.tune`: one YAML per preset (`<preset>.yaml`), or any file
given as `tune.space=PATH`. Shipped inside the wheel as the package `cca_ray.tune_spaces`
(pyproject maps this folder there), so a pip-installed cca-ray finds them too.

Format:

    metric: fid_proxy          # what ASHA ranks trials by (reported by every trial)
    mode: min
    params:                    # dotted config fields -> distributions
      train.lam:  {type: loguniform, low: 0.3, high: 30.0}
      train.beta: {type: loguniform, low: 0.02, high: 0.3}
      train.objective: {type: choice, values: [cca, cca_cfg]}

A test loads every file here and checks that each key names a config field and each bound is valid.
"""

from importlib import resources

SPACE_DIR = resources.files(__name__)
