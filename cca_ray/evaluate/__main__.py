from cca_ray.evaluate.job import main

main()
