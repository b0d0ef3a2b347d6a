from klein_agent.cli import main

raise SystemExit(main())
