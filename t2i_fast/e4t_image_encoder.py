"""E4T's optional reference image backbone: a local CLIP vision folder, used only where one is given.

    t2i-fast pretrain-e4t ... --image-encoder DIR     # then `train --method e4t --domain D` finds DIR by itself

DIR is a transformers CLIP vision folder (config.json + weights): a `CLIPVisionModelWithProjection` (the
`image_encoder` folder of an IP-Adapter download, for instance), a `CLIPVisionModel`, or a whole CLIP model
folder such as openai/clip-vit-large-patch14 saved locally. The encoder's image embedding (the projected one
where the folder has a projection, else the pooled output) joins the frozen model's own features
(e4t_domain.image_features), as the paper's encoder reads CLIP features beside the UNet's.

The domain file records the folder and a fingerprint of the encoder's weights: tuning loads the same folder
(or the one --image-encoder names, for a domain moved to another machine) and refuses a different encoder by
name, since the pre-trained head only understands the features it was trained on. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .cd_files import same_base, weight_signature
from .errors import UserError

# CLIP's own pixel normalisation (the values of its image processor)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_TYPES = ("clip_vision_model", "clip")


def load_image_encoder(folder: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen CLIP vision model in `folder` (fp32, eval mode); a one-line UserError for anything else."""
    path = Path(folder).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"--image-encoder {folder}: no config.json there; pass a local CLIP vision folder (a "
                        f"transformers CLIPVisionModel[WithProjection] or CLIP model saved with save_pretrained)")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type not in VISION_TYPES:
        kind = model_type or config.get("_class_name") or "unknown"
        raise UserError(f"--image-encoder {folder} holds a {kind!r} model, not a CLIP vision model; pass a "
                        f"CLIPVisionModel[WithProjection] folder")
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    projected = model_type == "clip" or "CLIPVisionModelWithProjection" in (config.get("architectures") or [])
    cls = CLIPVisionModelWithProjection if projected else CLIPVisionModel
    try:
        encoder = cls.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UserError(f"--image-encoder {folder} could not be loaded ({str(err).splitlines()[0]}); pass a "
                        f"complete CLIP vision folder") from None
    return encoder.to(device).eval().requires_grad_(False)


@torch.no_grad()
def clip_features(encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(N, E) image embeddings of (N, 3, R, R) pixels in [-1, 1]: resized to the encoder's size (bicubic,
    antialiased, as CLIP's processor) and normalised with CLIP's mean and std."""
    size = encoder.config.image_size
    device = next(encoder.parameters()).device
    x = (pixels.float().to(device) + 1) / 2
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=device)[:, None, None]
    out = encoder(pixel_values=(x - mean) / std)
    embeds = getattr(out, "image_embeds", None)
    return (embeds if embeds is not None else out.pooler_output).float()


def fingerprint(encoder: nn.Module) -> list[float]:
    """A signature of the encoder's first eight weight matrices (cd_files.weight_signature)."""
    return weight_signature([p for p in encoder.parameters() if p.dim() >= 2][:8])


def embedding_dim(encoder: nn.Module) -> int:
    """E, the width of clip_features' output."""
    projection = getattr(encoder, "visual_projection", None)
    return projection.out_features if projection is not None else encoder.config.hidden_size


def record(encoder: nn.Module, folder: str | Path) -> dict:
    """What a domain file keeps of its image encoder."""
    return {"image_encoder": str(Path(folder).expanduser().resolve()),
            "image_encoder_fingerprint": fingerprint(encoder), "image_encoder_dim": embedding_dim(encoder)}


def encoder_for_domain(info: dict, given: str | None, domain: str, device) -> nn.Module | None:
    """The image encoder a domain was pre-trained with (the folder `given`, else the recorded one), checked to
    be that encoder; None for a domain made without one. One-line UserErrors name the fix."""
    recorded = info.get("image_encoder")
    if recorded is None:
        if given:
            raise UserError(f"--image-encoder {given}: the domain {domain} was pre-trained without an image encoder; "
                            f"leave --image-encoder out, or pre-train a domain with it")
        return None
    folder = given or recorded
    if not Path(folder).expanduser().is_dir():
        raise UserError(f"the domain {domain} was pre-trained with the image encoder {recorded}, which is not there; "
                        f"pass --image-encoder DIR, a copy of that CLIP vision folder")
    encoder = load_image_encoder(folder, device)
    if not same_base(info.get("image_encoder_fingerprint"), fingerprint(encoder)):
        raise UserError(f"--image-encoder {folder} is not the image encoder the domain {domain} was pre-trained with "
                        f"({recorded}); pass that encoder's folder")
    return encoder
