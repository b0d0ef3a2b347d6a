"""Generator replicas on Ray Serve: the model in a Serve deployment (`deployment.py`, the only module here that
loads the pipeline), and the `ImageGenerator` a front-end's engine drives instead of a local model (`handle.py`,
no torch). What travels between them is `wire.py`: the request as the engine builds it, progress events, and the
result or an error the engine maps exactly as it maps a local model's.
"""
