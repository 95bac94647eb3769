"""`python -m gradserve.cli ...` runs the `gradserve` command."""

import sys

from .main import main

sys.exit(main())
