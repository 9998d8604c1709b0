"""`python -m trainers` ran the command line before twotower had one import root (0.1)."""
import sys

sys.exit("`python -m trainers` was replaced by `python -m twotower` (or the `twotower` command): "
         "the same sub-commands and arguments, e.g. `python -m twotower fit`.")
