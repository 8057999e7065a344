import sys

from dwcp.node.daemon import main

sys.exit(main())
