"""Evaluate saved embeddings (Recall@K, MAP@R, image-text recall): the script form of ``metrank evaluate``.

python eval/evaluate.py --query emb.npz:embeddings --labels emb.npz:labels --ks 1 2 4 8 --json results.json
python eval/evaluate.py --images img.npy --texts txt.npy --text-image-ids ids.npy --coco-1k
"""

import sys

from metrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
