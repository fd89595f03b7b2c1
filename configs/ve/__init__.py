"""score_sde's VE configs and the Soft Truncation repository's VE / RVE configs (presets: configs.presets)."""
