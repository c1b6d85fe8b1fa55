import sys

from eslora.cli import main

sys.exit(main())
