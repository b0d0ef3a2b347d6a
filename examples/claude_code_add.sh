#!/bin/sh
# Register klein-agent with Claude Code. Pick one.

# stdio: Claude Code starts the server (and loads the model) itself. --scope project writes ./.mcp.json
# (the same content as claude_code.mcp.json); the default scope is only for you, in this project.
claude mcp add --scope project klein-agent -- "$(command -v klein-agent)" serve --model black-forest-labs/FLUX.2-klein-4B

# HTTP: one resident model shared by several clients. Start the server first, in another terminal:
#   klein-agent serve --model black-forest-labs/FLUX.2-klein-4B --http --port 8765
# then register its URL with the bearer token the server wrote beside its store (or $KLEIN_AGENT_TOKEN's value):
# claude mcp add --transport http klein-agent http://127.0.0.1:8765/mcp \
#     --header "Authorization: Bearer $(cat ~/.local/share/klein-agent/store.http-token)"
