"""`python -m fsbench` is the `fsbench` command."""

import sys

from fsbench.cli import main

sys.exit(main())
