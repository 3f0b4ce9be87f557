"""``python -m atom_fast.distill``: see :mod:`atom_fast.distill.cli`."""

import sys

from atom_fast.distill.cli import main

sys.exit(main())
