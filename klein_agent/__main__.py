"""`python -m klein_agent`: the `klein-agent` console script."""

from klein_agent.cli import main

raise SystemExit(main())
