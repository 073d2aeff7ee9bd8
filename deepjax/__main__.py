"""`python -m deepjax ...`: the same as the `deepjax` command (deepjax/cli.py)."""

import sys

from deepjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
