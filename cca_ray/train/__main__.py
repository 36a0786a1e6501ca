from cca_ray.train.driver import main

main()
