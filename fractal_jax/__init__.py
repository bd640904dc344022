"""fractal-jax: Fractal Generative Models (Li, Sun, Fan, He, 2025) in JAX/Flax."""

__version__ = "0.1.0"
