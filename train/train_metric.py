"""Class-label metric learning (image retrieval): ``metrank train --task metric`` as a script.

python train/train_metric.py train/configs/emoji_instance.yaml [key.sub=value ...] [--resume]
torchrun --nproc_per_node 2 train/train_metric.py train/configs/fashion_mnist_metric.yaml
"""

import sys

from metrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--task", "metric", *sys.argv[1:]]))
