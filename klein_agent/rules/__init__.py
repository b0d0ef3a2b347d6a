"""What a request is and the rules it follows: request and result types, limits and defaults, the size/seed/step
resolution, recipes. No torch: the CLI and the server check requests with these before any model loads."""
