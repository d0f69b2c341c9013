"""Image-text retrieval training (frozen towers, trained projection heads; see metrank.training).

    python train/train_image_text.py train/configs/emoji_image_text.yaml [key.sub=value ...] [--resume]
    torchrun --nproc_per_node 2 train/train_image_text.py train/configs/emoji_image_text.yaml
"""
import sys

from metrank.training.run import main

if __name__ == "__main__":
    sys.exit(main(expected_task="image_text", description=__doc__))
