"""The FLUX.2 [klein] network in plain PyTorch: configs and presets, transformer, autoencoder, text encoder, sampling.

No file or network I/O here: modules are built from configs and filled by `klein_agent.loading`.
"""
