#!/usr/bin/env python3
"""Entry point for running odmrd straight from a checkout."""
import sys

from odmr.cli import main

if __name__ == "__main__":
    sys.exit(main())
