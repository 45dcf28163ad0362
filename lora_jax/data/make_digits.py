"""Writes `digits.npz` beside this file from scikit-learn's bundled 8x8 handwritten digits.

Run once, with scikit-learn installed in any environment (it is not a dependency of lora_jax):

    python lora_jax/data/make_digits.py

The output holds `images` uint8 (1797, 8, 8) with values 0..16 and `labels` uint8 (1797,), in
scikit-learn's order. The data's origin and licence are in `DIGITS_LICENSE.txt` beside it.
Nothing in lora_jax imports this script; `lora_jax.data.images` reads the `.npz`.
"""

from __future__ import annotations

import os

import numpy as np


def main() -> None:
    from sklearn.datasets import load_digits  # only here: the script's one optional dependency

    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    assert images.shape == (1797, 8, 8) and images.max() == 16, images.shape
    assert np.array_equal(images.astype(np.float64), digits.images), "values are not integers"
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
    np.savez_compressed(out, images=images, labels=labels)
    print(f"wrote {out}: images {images.shape} uint8, labels {labels.shape}, "
          f"class counts {np.bincount(labels).tolist()}")


if __name__ == "__main__":
    main()
