"""`python -m nodeagent ...`: the `nodeagent` command (nodeagent.cli), for a checkout without the console script."""

from __future__ import annotations

import sys

from nodeagent.cli import main

if __name__ == "__main__":
    sys.exit(main())
