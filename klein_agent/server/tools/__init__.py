"""The MCP tools, each with its description and annotations beside it: image making and the store."""
