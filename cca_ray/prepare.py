"""`python -m cca_ray.prepare`: the entry point of the data stage, which lives in cca_ray/data/prepare.py."""

from cca_ray.data.prepare import main

if __name__ == "__main__":
    main()
