"""``python -m surelock_fx.cli``: the ``surelock`` command."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
