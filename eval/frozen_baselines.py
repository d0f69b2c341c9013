"""Frozen-tower baselines of a training config (ridge map for image-text, raw features for metric learning); the
code is :mod:`metrank.training.baselines`.

    python eval/frozen_baselines.py train/configs/emoji_image_text.yaml
    python eval/frozen_baselines.py train/configs/emoji_instance.yaml
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from metrank.metrics import format_table
from metrank.training import load_config
from metrank.training.baselines import frozen_baselines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a training config (train/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for metrank train")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    rows = frozen_baselines(cfg)
    print(format_table(list(rows.values()), names=list(rows)))
    print(f"({'recalls in percent' if cfg.task == 'image_text' else 'fractions'}; {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
