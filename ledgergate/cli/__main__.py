"""`python -m ledgergate.cli ...` is the `ledgergate` command."""

import sys

from ledgergate.cli.main import main

sys.exit(main())
