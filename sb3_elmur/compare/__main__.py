import sys

from sb3_elmur.compare.cli import main

sys.exit(main())
