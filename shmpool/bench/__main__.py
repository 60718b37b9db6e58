import sys

from shmpool.bench.cli import main

sys.exit(main())
