"""Image-text retrieval training: ``metrank train --task image_text`` as a script (see metrank.training).

python train/train_image_text.py train/configs/emoji_image_text.yaml [key.sub=value ...] [--resume]
torchrun --nproc_per_node 2 train/train_image_text.py train/configs/emoji_image_text.yaml
"""

import sys

from metrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--task", "image_text", *sys.argv[1:]]))
