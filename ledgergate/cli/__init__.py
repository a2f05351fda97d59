"""The `ledgergate` command line: `main` (run, check, replay) and `audit` (forensic questions)."""
