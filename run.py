"""Entry point: ``python run.py method=slope model=resnet18`` (Hydra; ``-m`` for sweeps)."""

from __future__ import annotations

import sys

from slope_bench.cli import main, precheck

if __name__ == "__main__":
    precheck(sys.argv[1:])
    main()
