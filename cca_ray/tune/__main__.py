from cca_ray.tune.job import main

main()
