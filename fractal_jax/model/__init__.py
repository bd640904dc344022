"""The Flax model: level transformers composed recursively, and the official loss."""
