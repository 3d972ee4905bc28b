"""`python -m mackay_ext.cli` (torchrun too): the mackay-ext command."""
import sys

from . import main

sys.exit(main())
