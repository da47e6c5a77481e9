"""`python -m mgr.cli` runs the `mgr` command."""

import sys

from .main import main

sys.exit(main())
