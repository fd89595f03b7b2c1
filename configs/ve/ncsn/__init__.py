"""score_sde's NCSN (v1) configs (presets: configs.presets.set_ncsn, set_ncsn_v1_schedule)."""
