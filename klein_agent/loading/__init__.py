"""Turning weights into modules: finding checkpoints (folders, the Hugging Face cache), key maps between the
diffusers and BFL layouts, strict meta-device loading, and random weights of a preset's shape."""
