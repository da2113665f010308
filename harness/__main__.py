"""`python -m harness` is `diffbench`."""

import sys

from harness.cli import main

sys.exit(main())
