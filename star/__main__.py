import sys

from star.cli import main

sys.exit(main())
