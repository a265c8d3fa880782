"""`python -m velotune ...` (and `torchrun -m velotune ...`) run the CLI."""
import sys

from velotune.cli import main

sys.exit(main())
