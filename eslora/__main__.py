"""`python -m eslora ...` = the `eslora` command."""

import sys

from eslora.cli import main

sys.exit(main())
