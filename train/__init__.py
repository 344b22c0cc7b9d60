"""herd's training: config schema, loop, optimizer, checkpoints, metrics."""
