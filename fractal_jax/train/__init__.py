"""Training: the jitted step, the optimizer, the loop, training-state checkpoints and metric writers."""
