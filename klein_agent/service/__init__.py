"""The torch-free service: the engine that owns the model's thread, the image store, input handling, previews
and the PNG format, exports, and `Studio`, the domain layer the MCP tools and scripts call."""
