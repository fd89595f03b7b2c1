"""Experiments on the papers' claims at CPU scale (one script per claim; results in experiments/results/)."""
