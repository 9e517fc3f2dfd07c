import sys

from fedpers.bench.core import main

sys.exit(main())
