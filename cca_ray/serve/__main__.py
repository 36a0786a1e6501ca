from cca_ray.serve.app import main

main()
