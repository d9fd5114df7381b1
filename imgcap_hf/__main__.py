"""`python -m imgcap_hf ...`: see `imgcap_hf.cli`."""

import sys

from .cli import main

sys.exit(main())
