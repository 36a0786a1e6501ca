"""`python -m cca_ray.pretrain`: the entry point of pretraining, which lives in cca_ray/train/pretrain.py."""

from cca_ray.train.pretrain import main

if __name__ == "__main__":
    main()
