"""Numbers that say whether a model is good.

`digit_accuracy`: an independent classifier (scikit-learn SVC), trained on the real handwritten
digits, labels each generated image; the score is the share labelled with the digit its prompt
asked for. Images are compared at the digits' native 8x8, so any resolution works.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

DIGIT_PROMPT = re.compile(r"\bhandwritten digit (\d)\b")


def digit_features(images: list[Image.Image]) -> np.ndarray:
    """Dark-on-white RGB images -> sklearn-digits-like 8x8 ink intensities (0..16)."""
    gray = [np.asarray(im.convert("L").resize((8, 8), Image.BOX), dtype=np.float32) for im in images]
    return np.stack([(255.0 - g) * 16.0 / 255.0 for g in gray]).reshape(len(images), -1)


class DigitClassifier:
    def __init__(self, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        from .sources import render_digit

        digits = load_digits()
        # The real images go through the same render (and 8x8 box-down) as generated ones would.
        x = digit_features([render_digit(p) for p in digits.data])
        x_fit, x_held, y_fit, y_held = train_test_split(x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
        self.held_out_accuracy = float(SVC(gamma=0.001).fit(x_fit, y_fit).score(x_held, y_held))
        self.model = SVC(gamma=0.001).fit(x, digits.target)

    def predict(self, images: list[Image.Image]) -> np.ndarray:
        return self.model.predict(digit_features(images))


def prompt_digit(prompt: str) -> int | None:
    m = DIGIT_PROMPT.search(prompt)
    return int(m.group(1)) if m else None


def digit_accuracy(images: list[Image.Image], prompts: list[str]) -> dict | None:
    """Accuracy over the images whose prompt names a digit; None if no prompt does."""
    wanted = [prompt_digit(p) for p in prompts]
    keep = [i for i, d in enumerate(wanted) if d is not None]
    if not keep:
        return None
    clf = DigitClassifier()
    predicted = clf.predict([images[i] for i in keep])
    correct = predicted == np.array([wanted[i] for i in keep])
    per_digit = {str(d): float(correct[[wanted[i] == d for i in keep]].mean()) for d in sorted({wanted[i] for i in keep})}
    return {"digit_accuracy": float(correct.mean()), "digit_accuracy_per_digit": per_digit,
            "digit_images_scored": len(keep), "classifier_held_out_accuracy": clf.held_out_accuracy}
