"""``python -m jlora``: the ``jlora`` command line (``jlora.cli``)."""

import sys

from jlora.cli import main

if __name__ == "__main__":
  sys.exit(main())
