"""``python -m node`` entry point."""

from node.cli import main

raise SystemExit(main())
