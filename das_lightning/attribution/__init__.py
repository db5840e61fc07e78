"""Attribution features: output functions, timesteps, per-sample gradients, projectors, scores."""
