"""``python -m gateway.cli``, as the ``gateway`` script."""

import sys

from gateway.cli import main

sys.exit(main())
