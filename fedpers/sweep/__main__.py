import sys

from fedpers.sweep.cli import main

sys.exit(main())
