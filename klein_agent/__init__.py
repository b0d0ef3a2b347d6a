"""klein-agent: FLUX.2 [klein] and FLUX 3 [klein] as a tool for agents that iterate on pictures."""

__version__ = "0.1.0"
