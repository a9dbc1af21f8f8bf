"""Shared infrastructure below every other package: user errors, the config loader, checkpoints, metrics, images."""
