"""`python -m nnunet_margin.nnunet.benchmark FOLDER STEP`: one step of the benchmark in FOLDER, in this process (see
`runners.run_step`); what every executor starts."""

import sys
from pathlib import Path

from .runners import run_step

sys.exit(run_step(Path(sys.argv[1]), sys.argv[2]))
