import sys

from retina.cli import main

sys.exit(main())
