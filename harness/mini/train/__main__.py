"""`python -m harness.mini.train`: the same as `diffbench train-mini`."""

import sys

from harness.mini.train.cli import main

sys.exit(main())
