"""fractal-jax: Fractal Generative Models (Li, Sun, Fan, He, 2025) in JAX/Flax.

Files go through `etils.epath` (`fractal_jax.io.paths`), whose `gs://` paths
use gcsfs here: `EPATH_USE_TF=false` unless the environment sets it (epath
reads it once, at its first remote path).
"""

import os

os.environ.setdefault("EPATH_USE_TF", "false")

__version__ = "0.1.0"
