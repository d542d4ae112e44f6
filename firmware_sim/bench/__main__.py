"""Entry point of `python -m firmware_sim.bench` (see :mod:`firmware_sim.bench.runner`)."""

import sys

from firmware_sim.bench.runner import main

sys.exit(main())
