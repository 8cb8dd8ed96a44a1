"""Stage 3, train: model, weights, losses, the training loop, checkpoints, run config, tracking, loading a trained
run."""
