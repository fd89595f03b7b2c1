"""Sampler families (predictor-corrector, probability-flow ODE, fast deterministic, fast stochastic); sampling.py is
the public API and registry."""
