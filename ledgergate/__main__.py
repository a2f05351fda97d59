"""`python -m ledgergate ...` is the `ledgergate` command."""

import sys

from ledgergate.cli.main import main

sys.exit(main())
