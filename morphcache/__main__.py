import sys

from morphcache.cli import main

sys.exit(main())
