"""Class-label metric learning (image retrieval; frozen tower, trained projection head; see metrank.training).

    python train/train_metric.py train/configs/emoji_instance.yaml [key.sub=value ...] [--resume]
    torchrun --nproc_per_node 2 train/train_metric.py train/configs/fashion_mnist_metric.yaml
"""
import sys

from metrank.training.run import main

if __name__ == "__main__":
    sys.exit(main(expected_task="metric", description=__doc__))
