import sys

from twotower.cli import main

sys.exit(main())
