"""One module per `--mode` of `fractal_jax.main`: flag checking and printing; the work lives in the other packages.

`checks` says which flags each mode reads and checks a run's input before the mode starts.
"""
