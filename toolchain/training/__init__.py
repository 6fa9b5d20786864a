"""Training the detector: targets, data, losses, the training loop."""
