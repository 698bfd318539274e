"""``python -m attnkern ...``: the same command as ``attnkern ...``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
