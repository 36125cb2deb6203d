"""Print a run's result tables and where its figures are (the last step of `make demo`).

Usage:
    python -m common.report --config configs/demo.yaml
"""

from __future__ import annotations

import sys

from common import cli
from common.steps import run_dir


def main(argv: list[str] | None = None) -> int:
    cfg, _ = cli.start(argv, __doc__, "report")
    root = run_dir(cfg)
    tables = [root / "04_cluster" / "table.md", *sorted((root / "06_evaluate").glob("*/tables.md")),
              *sorted((root / "07_gradcam").glob("*/cam_stats.md"))]
    for path in tables:
        print(f"\n# {path.relative_to(root)}\n{path.read_text()}")
    print("Figures:")
    for path in sorted(root.rglob("*.png")):
        print(f"   {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
