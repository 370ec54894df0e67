"""`python -m nanoseek ...` (and `torchrun -m nanoseek ...`) runs the command line."""

import sys

from nanoseek.cli import main

sys.exit(main())
