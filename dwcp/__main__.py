import sys

from dwcp.cli import main

sys.exit(main())
