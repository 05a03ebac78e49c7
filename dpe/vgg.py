"""VGG19 feature extractor (conv1_1 .. relu5_1) for the perceptual loss.

torchvision cannot be imported on the project's machines, so the network is defined
here with torchvision's layer indices (``features.N.weight``) and loads its published
ImageNet weights (``vgg19-dcbb9e9d.pth``) from a file. Nothing is downloaded: the file
comes from an explicit path or the torch hub cache, ``$TORCH_HOME/hub/checkpoints``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

VGG19_WEIGHTS_FILE = "vgg19-dcbb9e9d.pth"
VGG19_WEIGHTS_URL = f"https://download.pytorch.org/models/{VGG19_WEIGHTS_FILE}"

# Output channels per conv layer of VGG19 up to conv5_1; "M" is a 2x2 max pool.
_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512)
# Index (in ``features``) of the ReLU after conv1_1, conv2_1, conv3_1, conv4_1, conv5_1.
RELU_X_1 = (1, 6, 11, 20, 29)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGWeightsNotFoundError(FileNotFoundError):
    """The VGG19 weights file is missing; the message says where to put it."""


def default_vgg19_weights_path() -> Path:
    """Where torchvision would cache the weights: ``$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_WEIGHTS_FILE


def resolve_vgg19_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file to load: ``path`` if given, else the hub cache; raise if it is absent."""
    candidate = Path(path) if path is not None else default_vgg19_weights_path()
    if not candidate.is_file():
        raise VGGWeightsNotFoundError(
            f"VGG19 weights for the perceptual loss not found at {candidate}. Download {VGG19_WEIGHTS_URL} "
            f"and save it as {default_vgg19_weights_path()} (or set TORCH_HOME), or pass its location "
            "explicitly (vgg_weights=PATH), or train without the perceptual term (perceptual=False)."
        )
    return candidate


class VGG19Features(nn.Module):
    """Frozen VGG19 trunk returning relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1.

    Takes images in [-1, 1] and applies the ImageNet normalisation itself.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1), nn.ReLU()]
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = ((images + 1.0) / 2.0 - self.mean) / self.std
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in RELU_X_1:
                outputs.append(x)
        return outputs

    def train(self, mode: bool = True) -> "VGG19Features":
        """Stays in eval mode: it is a fixed feature extractor."""
        return super().train(False)


def load_vgg19(path: str | os.PathLike[str] | None = None) -> VGG19Features:
    """VGG19Features with weights from ``path`` or the hub cache (torchvision key names)."""
    weights_path = resolve_vgg19_weights(path)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model = VGG19Features()
    wanted = model.state_dict().keys()
    missing = [key for key in wanted if key not in state]
    if missing:
        raise ValueError(
            f"{weights_path} is not a torchvision VGG19 state dict: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}. Use {VGG19_WEIGHTS_URL}."
        )
    model.load_state_dict({key: state[key] for key in wanted})
    return model
