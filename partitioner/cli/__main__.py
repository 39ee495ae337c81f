"""``python -m partitioner.cli ...`` (and ``torchrun ... -m partitioner.cli run ...``)."""

import sys

from partitioner.cli.main import main

sys.exit(main())
