"""`python3 -m odmr` and the zipapp start here."""
import sys

from odmr.cli import main

sys.exit(main())
