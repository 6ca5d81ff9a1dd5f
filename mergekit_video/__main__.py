"""``python -m mergekit_video`` = ``mergevid`` (for ``torchrun -m mergekit_video run RECIPE``)."""

import sys

from mergekit_video.cli.main import main

sys.exit(main())
