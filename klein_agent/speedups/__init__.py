"""Where and how fast the model runs: device and dtype choice, FP8 linear layers, regional compilation."""
