"""Files: fractal-jax checkpoints, the official PyTorch layout and pickles, image files."""
