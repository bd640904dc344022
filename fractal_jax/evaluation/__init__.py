"""Evaluation: held-out NLL, Inception features and image metrics, the digits classifier."""
