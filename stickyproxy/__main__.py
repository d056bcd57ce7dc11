"""Run the command line with ``python -m stickyproxy``."""

import sys

from stickyproxy.cli import main

sys.exit(main())
