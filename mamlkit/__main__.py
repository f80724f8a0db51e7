import sys

from mamlkit.cli import main

sys.exit(main())
