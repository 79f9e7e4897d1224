"""Training: multi-exit losses, train state, the training loop, the exit classifier stage."""
