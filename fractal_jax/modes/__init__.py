"""One module per `--mode` of `fractal_jax.main`: flag checking and printing; the work lives in the other packages."""
