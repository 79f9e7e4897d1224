"""Training: multi-exit losses, train state, and the resumable training loop."""
from adaptive_depth.train.loop import train_and_evaluate
