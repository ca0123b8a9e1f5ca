"""Numbers that say whether a model is good.

`val_loss`: the diffusion loss on the cached samples held out of training (`train.val_samples`),
each at the same `sample.val_timesteps` evenly spaced timesteps with the same noise every time, from
the posterior mean and first caption: comparable across checkpoints and across runs on one cache.

`clip_score`: 100 x the cosine similarity of CLIP's image and prompt embeddings (floored at 0),
averaged over the images, when `sample.clip_model` names a local CLIP folder.

`digit_accuracy`: an independent classifier (scikit-learn SVC), trained on the real handwritten
digits, labels each generated image; the score is the share labelled with the digit its prompt
asked for. Images are compared at the digits' native 8x8, so any resolution works.

`digit_spread`: how varied the images of one prompt are, as a share of how varied the real digits of
that class are: the mean pairwise distance between a prompt's images over the mean pairwise distance
between the real digits of its class (1.0: as varied as the data; a model that draws one image for
every seed: 0). Measured in the classifier's space, the 8x8 ink intensities: the digits were
captured at 8x8 (sklearn's), so finer detail in any image is its renderer's smoothing, not variety.
Beside it `digit_precision` / `digit_recall` (Kynkäänniemi et al. 2019, k = 3): the share of images
inside the k-nearest-neighbour balls of the real digits (they look like real ones), and the share of
real digits inside the images' balls (the real variety the images cover), against as many real digits
of each class as there are images asking for it, drawn with a fixed seed.

`clip_spread`, `clip_precision`, `clip_recall`: the same three in CLIP's image-embedding space (unit
vectors), for any data, when `sample.clip_model` is set. The reference is the real images of the
cache (the held-out ones; a data set that holds none out: its first training images), decoded by the
VAE as training saw them. A prompt's spread needs at least two real images with that prompt as
their caption (a DreamBooth instance caption, a class of the digits); captions unique to one image
(most captioned data) give no per-prompt reference, and `clip_spread_skipped` says so. Precision
and recall compare the images of the prompts that have real images with all those real images.
`clip_sample_spread` (the mean pairwise distance of one prompt's images, averaged over prompts) is
always written: an absolute figure, comparable with `base` and across runs on one data set.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


DIGIT_PROMPT = re.compile(r"\bhandwritten digit (\d)\b")


def digit_features(images: list[Image.Image]) -> np.ndarray:
    """Dark-on-white RGB images -> sklearn-digits-like 8x8 ink intensities (0..16); a non-square
    image is squeezed to 8x8 whole (builtin:digits-aspect stretches its digits to 72x48 and 48x72)."""
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
        self.features, self.labels = x, digits.target
        x_fit, x_held, y_fit, y_held = train_test_split(x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
        self.held_out_accuracy = float(SVC(gamma=0.001).fit(x_fit, y_fit).score(x_held, y_held))
        self.model = SVC(gamma=0.001).fit(x, digits.target)

    def predict(self, images: list[Image.Image]) -> np.ndarray:
        return self.model.predict(digit_features(images))


@cache
def digit_classifier() -> DigitClassifier:
    """One fitted classifier per process (the sample stage scores the fine-tuned and the base model's
    images; each fit took ~1 s)."""
    return DigitClassifier()


def prompt_digit(prompt: str) -> int | None:
    m = DIGIT_PROMPT.search(prompt)
    return int(m.group(1)) if m else None


def digit_accuracy(images: list[Image.Image], prompts: list[str], prompt_digits: dict[str, int] | None = None
                   ) -> dict | None:
    """Accuracy over the images whose prompt names a digit (or is given one by `prompt_digits`, e.g.
    a DreamBooth token's prompt); overall, per digit and per prompt. None if no prompt has a digit."""
    wanted = [(prompt_digits or {}).get(p, prompt_digit(p)) for p in prompts]
    keep = [i for i, d in enumerate(wanted) if d is not None]
    if not keep:
        return None
    clf = digit_classifier()
    predicted = clf.predict([images[i] for i in keep])
    correct = predicted == np.array([wanted[i] for i in keep])
    per_digit = {str(d): float(correct[[wanted[i] == d for i in keep]].mean()) for d in sorted({wanted[i] for i in keep})}
    per_prompt = {p: float(correct[[prompts[i] == p for i in keep]].mean()) for p in dict.fromkeys(prompts[i] for i in keep)}
    return {"digit_accuracy": float(correct.mean()), "digit_accuracy_per_digit": per_digit,
            "digit_accuracy_per_prompt": per_prompt,
            "digit_images_scored": len(keep), "classifier_held_out_accuracy": clf.held_out_accuracy}


def mean_pairwise_distance(x: np.ndarray) -> float:
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return float(d[np.triu_indices(len(x), 1)].mean())


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row."""
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k]  # column 0: itself


def covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """For each point: inside some centre's ball."""
    d = np.sqrt(((points[:, None] - centres[None]) ** 2).sum(-1))
    return (d <= radii[None]).any(axis=1)


def spread_scores(prefix: str, x: np.ndarray, by_prompt: dict[str, list[int]], reference: dict[str, np.ndarray],
                  pool: np.ndarray, k: int) -> dict:
    """{prefix}_spread (mean over prompts) and _spread_per_prompt: the mean pairwise distance of a
    prompt's rows of `x` over that of its `reference` rows (prompts with two or more of each);
    {prefix}_precision / _recall of all those rows against `pool` with k-NN balls (both above k rows)."""
    per_prompt = {p: mean_pairwise_distance(x[idx]) / mean_pairwise_distance(reference[p])
                  for p, idx in by_prompt.items() if len(idx) >= 2 and len(reference.get(p, ())) >= 2}
    result: dict = {}
    if per_prompt:
        result |= {f"{prefix}_spread": float(np.mean(list(per_prompt.values()))), f"{prefix}_spread_per_prompt": per_prompt}
    generated = x[[i for p, idx in by_prompt.items() if p in reference for i in idx]]
    if len(generated) > k and len(pool) > k:
        result |= {f"{prefix}_precision": float(covered(generated, pool, knn_radii(pool, k)).mean()),
                   f"{prefix}_recall": float(covered(pool, generated, knn_radii(generated, k)).mean()),
                   f"{prefix}_knn_k": k}
    return result


def digit_spread(images: list[Image.Image], prompts: list[str], prompt_digits: dict[str, int] | None = None,
                 k: int = 3, seed: int = 0) -> dict | None:
    """Spread per prompt and overall (the mean over prompts), precision and recall (module docstring);
    None if fewer than two images ask for one digit."""
    wanted = [(prompt_digits or {}).get(p, prompt_digit(p)) for p in prompts]
    keep = [i for i, d in enumerate(wanted) if d is not None]
    by_prompt = {p: [i for i in keep if prompts[i] == p] for p in dict.fromkeys(prompts[i] for i in keep)}
    if all(len(idx) < 2 for idx in by_prompt.values()):
        return None
    clf = digit_classifier()
    digits = sorted(set(wanted) - {None})
    real_of = {d: clf.features[clf.labels == d] for d in digits}
    rng = np.random.default_rng(seed)
    pool = np.concatenate([real_of[d][rng.choice(len(real_of[d]), sum(wanted[i] == d for i in keep), replace=False)]
                           for d in digits])
    reference = {p: real_of[wanted[idx[0]]] for p, idx in by_prompt.items()}
    return (spread_scores("digit", digit_features(images), by_prompt, reference, pool, k)
            | {"digit_real_spread_per_digit": {str(d): mean_pairwise_distance(real_of[d]) for d in digits}})


@torch.no_grad()
def validation_loss(model, objective, family, samples: list[dict], scaling: tuple[float, float], timesteps: int,
                    device: torch.device, batch: int = 64) -> float | None:
    """Mean diffusion loss (workflow/objective.py, as training computes it) over held-out samples x
    fixed timesteps, with fixed per-sample noise."""
    if not samples:
        return None
    scale, shift = scaling
    by_shape: dict[tuple, list[tuple[int, int]]] = {}  # a batch holds one bucket's size
    for i in range(len(samples)):
        shape = tuple(samples[i]["mean"].shape)
        by_shape.setdefault(shape, []).extend((i, t) for t in objective.fixed_timesteps(timesteps, shape[1:]).tolist())
    noise = {i: torch.randn(samples[i]["mean"].shape[1:], generator=torch.Generator().manual_seed(i))
             for i in range(len(samples))}
    dtype = next(model.parameters()).dtype
    losses = []
    chunks = [cases[start : start + batch] for cases in by_shape.values() for start in range(0, len(cases), batch)]
    for chunk in chunks:
        latents = torch.stack([(samples[i]["mean"][0].float() - shift) * scale for i, _ in chunk])
        eps = torch.stack([noise[i] for i, _ in chunk])
        text = torch.stack([samples[i]["text"][0].float() for i, _ in chunk])
        pooled = torch.stack([samples[i]["pooled"][0].float() for i, _ in chunk]) if "pooled" in samples[0] else None
        sizes = torch.stack([samples[i]["size"][0] for i, _ in chunk])
        t = torch.tensor([t for _, t in chunk])
        noisy, target = objective.noisy(latents, eps, t), objective.target(latents, eps, t)
        pred = family.predict(model, noisy.to(device), t.to(device), text.to(device),
                              None if pooled is None else pooled.to(device), sizes.to(device), dtype, objective.guidance)
        losses.append(F.mse_loss(pred.float().cpu(), target, reduction="none").mean(dim=(1, 2, 3)))
    return float(torch.cat(losses).mean())


@cache
def load_clip(clip_model: str, device: torch.device):
    """(CLIPModel, CLIPProcessor) from a local folder, once per process (score and spread share it)."""
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(clip_model).to(device).eval(), CLIPProcessor.from_pretrained(clip_model)


def clip_unusable(clip_model: str | None) -> str | None:
    if not clip_model:
        return "sample.clip_model is not set"
    if not Path(clip_model).is_dir():
        return f"no CLIP model folder at {clip_model}"
    return None


def clip_score(images: list[Image.Image], prompts: list[str], clip_model: str | None, device: torch.device) -> dict:
    """{"clip_score": ...} or, with no usable CLIP model, {"clip_score": None, "clip_score_skipped": why}."""
    why = clip_unusable(clip_model)
    if why:
        return {"clip_score": None, "clip_score_skipped": why}
    model, processor = load_clip(clip_model, device)
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), 32):
            inputs = processor(text=prompts[start : start + 32], images=images[start : start + 32], return_tensors="pt",
                               padding=True, truncation=True).to(device)
            img = F.normalize(_embeds(model.get_image_features(pixel_values=inputs["pixel_values"])), dim=-1)
            txt = F.normalize(_embeds(model.get_text_features(input_ids=inputs["input_ids"],
                                                              attention_mask=inputs["attention_mask"])), dim=-1)
            scores.append((100 * (img * txt).sum(-1)).clamp(min=0).cpu())
    return {"clip_score": float(torch.cat(scores).mean()), "clip_model": clip_model}


@torch.no_grad()
def clip_image_features(images: list[Image.Image], clip_model: str, device: torch.device) -> np.ndarray:
    """CLIP's projected image embeddings, unit length, as float64 rows."""
    model, processor = load_clip(clip_model, device)
    out = [F.normalize(_embeds(model.get_image_features(
        pixel_values=processor(images=images[start : start + 32], return_tensors="pt")["pixel_values"].to(device))), dim=-1)
           for start in range(0, len(images), 32)]
    return torch.cat(out).double().cpu().numpy()


def clip_spread(images: list[Image.Image], prompts: list[str], real_images: list[Image.Image], real_captions: list[str],
                clip_model: str | None, device: torch.device, k: int = 3) -> dict:
    """The spread, precision and recall of the images in CLIP's image space against the real images
    whose caption is their prompt (module docstring); the skipped parts say why."""
    why = clip_unusable(clip_model)
    if why:
        return {"clip_spread": None, "clip_spread_skipped": why}
    x = clip_image_features(images, clip_model, device)
    by_prompt = {p: [i for i, q in enumerate(prompts) if q == p] for p in dict.fromkeys(prompts)}
    result = {"clip_sample_spread": float(np.mean([mean_pairwise_distance(x[idx]) for idx in by_prompt.values()
                                                   if len(idx) >= 2] or [np.nan]))}
    wanted = [i for i, c in enumerate(real_captions) if c in by_prompt]
    real = clip_image_features([real_images[i] for i in wanted], clip_model, device) if wanted else np.zeros((0, 1))
    reference = {p: real[[j for j, i in enumerate(wanted) if real_captions[i] == p]] for p in by_prompt}
    reference = {p: rows for p, rows in reference.items() if len(rows)}
    result |= spread_scores("clip", x, by_prompt, reference, real, k)
    if "clip_spread" not in result:
        result |= {"clip_spread": None, "clip_spread_skipped":
                   f"no prompt has two or more real images with it as their caption (of {len(real_captions)} real "
                   f"images, {len(wanted)} have a prompt's caption): a prompt's spread has no reference"}
    return result | {"clip_real_images": len(wanted)}


def _embeds(out) -> torch.Tensor:
    """The projected embeddings: transformers 5 wraps them in an output object (pooler_output)."""
    return out if torch.is_tensor(out) else out.pooler_output
