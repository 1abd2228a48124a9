"""Training: the loop, schedules, data, checkpoints and run reports."""
