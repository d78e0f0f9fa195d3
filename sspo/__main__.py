import sys

from sspo.cli import main

sys.exit(main())
