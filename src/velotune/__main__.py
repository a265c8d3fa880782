"""`python -m velotune ...` is the `velotune` command; torchrun starts ranks this way
(`torchrun --nproc-per-node N -m velotune train CONFIG`)."""
import sys

from velotune.cli import main

if __name__ == "__main__":
    sys.exit(main())
