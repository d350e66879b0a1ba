"""`python -m polmodel.cli ARGS`: the same as the `polmodel ARGS` command."""
import sys

from polmodel.cli import main

sys.exit(main())
