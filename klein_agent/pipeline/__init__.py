"""The resident pipeline: model, loading and speed-ups wired into an `ImageGenerator`."""

from klein_agent.pipeline.build import load_pipeline
from klein_agent.pipeline.klein import KleinPipeline, initial_noise

__all__ = ["KleinPipeline", "initial_noise", "load_pipeline"]
