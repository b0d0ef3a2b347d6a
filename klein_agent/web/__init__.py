"""HTTP plumbing shared by `serve --http` and `klein-agent gallery`, with no MCP and no torch: binding the port,
the bearer token and the one-time login link, the guard in front of every route (`guard`), the deadline on slow
request headers (`protocol`), and running uvicorn on a bound socket (`listen`)."""
