"""torch Dataset over one split of a :class:`~da_seg.data.domains.Domain`."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from da_seg.data.domains import Domain


class SegmentationDataset(Dataset):
    """Items are ``{"image": uint8 (3, H, W), "index": int}`` plus ``"label": int64 (H, W)`` train
    ids (255 = ignore) when ``with_labels``.

    ``size = (H, W)`` resizes on load: the image bilinearly with antialiasing, the label by
    nearest neighbour. Without labels no label file is ever opened or even listed.
    """

    def __init__(self, domain: Domain, split: str, with_labels: bool, size: tuple[int, int] | None = None):
        self.domain = domain
        self.split = split
        self.with_labels = with_labels
        self.size = tuple(size) if size is not None else None
        self.samples = domain.samples(split, with_labels=with_labels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        if self.with_labels:
            image, label = self.domain.read_pair(sample)
        else:
            image, label = self.domain.read_image(sample.image), None
        item = {"image": self._image_tensor(image), "index": index}
        if label is not None:
            item["label"] = self._label_tensor(label)
        return item

    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()  # (3, H, W)
        if self.size is None or tuple(tensor.shape[1:]) == self.size:
            return tensor
        resized = F.interpolate(
            tensor[None].float(), size=self.size, mode="bilinear", align_corners=False, antialias=True
        )[0]
        return resized.round_().clamp_(0, 255).to(torch.uint8)

    def _label_tensor(self, label: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(label)).long()  # (H, W)
        if self.size is None or tuple(tensor.shape) == self.size:
            return tensor
        # "nearest-exact" samples pixel centres; plain "nearest" shifts labels by half a pixel.
        resized = F.interpolate(tensor[None, None].float(), size=self.size, mode="nearest-exact")
        return resized[0, 0].long()
