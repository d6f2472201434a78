"""Evaluation: a small digit classifier trained on the real training split, and the metrics computed with it.

* Features: the classifier's 64-d penultimate layer (after ReLU), as Inception's pool features are for FID.
* FD (Frechet distance) between Gaussians fitted to the features of generated samples and of the real held-out split:
  |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), in float64.
* Accuracy: share of samples prompted with "digit k" that the classifier labels k.
* Diversity: per class, the mean pairwise feature distance among generated samples divided by the same quantity among
  real held-out samples of that class; averaged over classes. 1 = as diverse as real data, << 1 = mode collapse.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

FEATURE_DIM = 64


class DigitNet(nn.Module):
    """A small CNN for 16x16 grey digits in [-1, 1]: two strided convs, then a 64-d feature layer and 10 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # 8x8
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),  # 4x4
            nn.Flatten(), nn.Linear(64 * 16, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(-1, 1, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: np.ndarray, labels: np.ndarray, *, epochs: int = 30, seed: int = 0) -> DigitNet:
    """Adam, batch 64, cross-entropy, with +-1 pixel random shifts (on the 8x8 grid) as augmentation.

    Trained on one thread whatever the caller's setting: the thread count changes the order of floating-point sums,
    hence the trained classifier and every FD measured with it (by about 1 point), so every script gets the same
    instrument."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(images, labels, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> DigitNet:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x, y = torch.from_numpy(images).float(), torch.from_numpy(labels).long()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(x[idx], shifts=(2 * dy, 2 * dx), dims=(1, 2))  # one 8x8 pixel = 2 pixels here
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def features_and_predictions(net: DigitNet, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (float64 [N, 64]) and predicted labels [N] for images [N, 16, 16] in [-1, 1]."""
    x = torch.as_tensor(images).float()
    feats, preds = [], []
    for i in range(0, len(x), 500):
        f = net.features(x[i:i + 500])
        feats.append(f.double())
        preds.append(net.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features [N, D], float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def load_reference(classifier_path: str, held_images) -> tuple["DigitNet", np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """A saved classifier (eval mode), the held-out images' features and their Gaussian statistics (FD's reference)."""
    net = DigitNet()
    net.load_state_dict(torch.load(classifier_path))
    net.eval()
    ref_feats, _ = features_and_predictions(net, held_images)
    return net, ref_feats, gaussian_stats(ref_feats)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    """Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b), float64.

    tr((S_a S_b)^1/2) is computed as tr((S_a^1/2 S_b S_a^1/2)^1/2): the same eigenvalues, but a symmetric PSD matrix,
    so the square root is an eigendecomposition (no complex round-off as with sqrtm of the non-symmetric product).
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.size, mu_a.size):
        raise ValueError(f"shape mismatch: mu {mu_a.shape} vs {mu_b.shape}, cov {cov_a.shape} vs {cov_b.shape}")
    sa = _sqrt_psd(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sa @ cov_b @ sa), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


def mean_pairwise_distance(feats: np.ndarray) -> float:
    """Mean Euclidean distance over all unordered pairs of rows."""
    f = np.asarray(feats, dtype=np.float64)
    if len(f) < 2:
        raise ValueError("mean_pairwise_distance needs at least 2 rows")
    sq = (f ** 2).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0, None)
    iu = np.triu_indices(len(f), k=1)
    return float(np.sqrt(d2[iu]).mean())


def diversity_ratio(feats: np.ndarray, labels: np.ndarray, ref_feats: np.ndarray, ref_labels: np.ndarray) -> float:
    """Mean over classes of (within-class mean pairwise distance of `feats`) / (the same for the reference)."""
    ratios = []
    for k in np.unique(ref_labels):
        a, b = feats[labels == k], ref_feats[ref_labels == k]
        if len(a) >= 2 and len(b) >= 2:
            ratios.append(mean_pairwise_distance(a) / mean_pairwise_distance(b))
    if not ratios:
        raise ValueError("diversity_ratio: no class has >= 2 samples in both sets")
    return float(np.mean(ratios))


def evaluate(net: DigitNet, images, prompted: np.ndarray, ref_feats: np.ndarray, ref_labels: np.ndarray,
             ref_stats=None) -> dict:
    """FD against the reference features, class accuracy and diversity of generated `images` prompted `prompted`."""
    feats, preds = features_and_predictions(net, images)
    if not np.isfinite(feats).all():
        raise ValueError("generated samples gave non-finite classifier features")
    mu_r, cov_r = ref_stats if ref_stats is not None else gaussian_stats(ref_feats)
    return {"fd": frechet_distance(*gaussian_stats(feats), mu_r, cov_r),
            "accuracy": float((preds == prompted).mean()),
            "diversity": diversity_ratio(feats, prompted, ref_feats, ref_labels),
            "n": int(len(prompted))}
