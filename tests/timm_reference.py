"""A timm-equivalent ``Mixup`` for the tests (timm imports torchvision, which is not installed here).

Follows timm 1.0.29's ``timm/data/mixup.py`` path by path: the same draws from NumPy's global
state in the same order (``rand`` for prob / switch, ``beta``, then per cut sample ``randint``
for the box), the same box geometry, lambda correction, in-place mixing of a (B, C, H, W) float
batch with its reverse, and ``mixup_target``. Kept independent of fastgenlabel's code.
"""
import numpy as np
import torch


def box_from_lam(h, w, lam):
    ratio = np.sqrt(1 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy = np.random.randint(0, h)
    cx = np.random.randint(0, w)
    return (np.clip(cy - ch // 2, 0, h), np.clip(cy + (ch + 1) // 2, 0, h),
            np.clip(cx - cw // 2, 0, w), np.clip(cx + (cw + 1) // 2, 0, w))


def box_minmax(h, w, minmax):
    ch = np.random.randint(int(h * minmax[0]), int(h * minmax[1]))
    cw = np.random.randint(int(w * minmax[0]), int(w * minmax[1]))
    y0 = np.random.randint(0, h - ch + 1)
    x0 = np.random.randint(0, w - cw + 1)
    return y0, y0 + ch, x0, x0 + cw


def box_and_lam(h, w, lam, minmax, correct_lam):
    box = box_minmax(h, w, minmax) if minmax is not None else box_from_lam(h, w, lam)
    if correct_lam or minmax is not None:
        y0, y1, x0, x1 = box
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return box, lam


class TimmMixup:
    def __init__(self, mixup_alpha=1.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                 mode="batch", correct_lam=True, label_smoothing=0.1, num_classes=1000):
        self.ma, self.ca, self.minmax = mixup_alpha, cutmix_alpha, cutmix_minmax
        if cutmix_minmax is not None:
            self.ca = 1.0
        self.prob, self.switch, self.mode = prob, switch_prob, mode
        self.correct_lam, self.smoothing, self.k = correct_lam, label_smoothing, num_classes
        self.mixup_enabled = True

    def per_elem(self, n):
        lam = np.ones(n, dtype=np.float32)
        cut = np.zeros(n, dtype=bool)
        if self.mixup_enabled:
            if self.ma > 0 and self.ca > 0:
                cut = np.random.rand(n) < self.switch
                drawn = np.where(cut, np.random.beta(self.ca, self.ca, size=n), np.random.beta(self.ma, self.ma, size=n))
            elif self.ma > 0:
                drawn = np.random.beta(self.ma, self.ma, size=n)
            else:
                cut = np.ones(n, dtype=bool)
                drawn = np.random.beta(self.ca, self.ca, size=n)
            lam = np.where(np.random.rand(n) < self.prob, drawn.astype(np.float32), lam)
        return lam, cut

    def per_batch(self):
        if not (self.mixup_enabled and np.random.rand() < self.prob):
            return 1.0, False
        if self.ma > 0 and self.ca > 0:
            cut = np.random.rand() < self.switch
            lam = np.random.beta(self.ca, self.ca) if cut else np.random.beta(self.ma, self.ma)
        elif self.ma > 0:
            cut, lam = False, np.random.beta(self.ma, self.ma)
        else:
            cut, lam = True, np.random.beta(self.ca, self.ca)
        return float(lam), cut

    def mix_pairs(self, x, n, both):
        b, h, w = len(x), x.shape[2], x.shape[3]
        lam_all, cut = self.per_elem(n)
        orig = x.clone()
        for i in range(n):
            j = b - i - 1
            lam = lam_all[i]
            if lam != 1.0:
                if cut[i]:
                    (y0, y1, x0, x1), lam = box_and_lam(h, w, lam, self.minmax, self.correct_lam)
                    x[i][:, y0:y1, x0:x1] = orig[j][:, y0:y1, x0:x1]
                    if both:
                        x[j][:, y0:y1, x0:x1] = orig[i][:, y0:y1, x0:x1]
                    lam_all[i] = lam
                else:
                    x[i] = x[i] * lam + orig[j] * (1 - lam)
                    if both:
                        x[j] = x[j] * lam + orig[i] * (1 - lam)
        if both:
            lam_all = np.concatenate((lam_all, lam_all[::-1]))
        return torch.tensor(lam_all, device=x.device, dtype=x.dtype).unsqueeze(1)

    def mix_batch(self, x):
        lam, cut = self.per_batch()
        if lam == 1.0:
            return 1.0
        if cut:
            (y0, y1, x0, x1), lam = box_and_lam(x.shape[2], x.shape[3], lam, self.minmax, self.correct_lam)
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        else:
            flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(flipped)
        return lam

    def __call__(self, x, target):
        assert len(x) % 2 == 0
        if self.mode == "elem":
            lam = self.mix_pairs(x, len(x), both=False)
        elif self.mode == "pair":
            lam = self.mix_pairs(x, len(x) // 2, both=True)
        else:
            lam = self.mix_batch(x)
        off = self.smoothing / self.k
        on = 1.0 - self.smoothing + off
        y1 = torch.full((len(target), self.k), off, device=target.device).scatter_(1, target.view(-1, 1), on)
        y2 = torch.full((len(target), self.k), off, device=target.device).scatter_(1, target.flip(0).view(-1, 1), on)
        return x, y1 * lam + y2 * (1.0 - lam)
