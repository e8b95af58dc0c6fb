"""Test-only converters: write checkpoints in foreign layouts, the inverses of the renamings the loaders apply
(models.efficientformer.snap_to_timm, models.vit.deit3_fb_to_timm). The library never needs these: they exist
so that tests can build snap-research / facebookresearch files from a timm model without downloading any."""
import torch

_SNAP_STEM = {"conv1": "0", "norm1": "1", "conv2": "3", "norm2": "4"}  # timm stem names -> snap's Sequential idx


def timm_to_snap(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm EfficientFormer keys -> the snap-research layout (`efficientformer_l*_300d.pth`):

        stem.{conv1,norm1,conv2,norm2}.*     -> patch_embed.{0,1,3,4}.*
        stages.s.blocks.j.*                  -> network.(2 s).j.*
        stages.s.downsample.{conv,norm}.*    -> network.(2 s - 1).{proj,norm}.*
        *.ls{1,2}.gamma                      -> *.layer_scale_{1,2}
        head_dist.*                          -> dist_head.*
    """
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "stem":
            parts = ["patch_embed", _SNAP_STEM[parts[1]]] + parts[2:]
        elif parts[0] == "stages" and parts[2] == "blocks":
            parts = ["network", str(2 * int(parts[1]))] + parts[3:]
        elif parts[0] == "stages" and parts[2] == "downsample":
            parts = ["network", str(2 * int(parts[1]) - 1), {"conv": "proj", "norm": "norm"}[parts[3]]] + parts[4:]
        elif parts[0] == "head_dist":
            parts = ["dist_head"] + parts[1:]
        if len(parts) >= 2 and parts[-1] == "gamma" and parts[-2] in ("ls1", "ls2"):
            parts = parts[:-2] + ["layer_scale_" + parts[-2][-1]]
        out[".".join(parts)] = value
    return out


def timm_to_deit3_fb(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm DeiT III keys -> the facebookresearch layout (`deit_3_*.pth`): `blocks.i.ls{1,2}.gamma` ->
    `blocks.i.gamma_{1,2}`; every other key is the same."""
    out = {}
    for key, value in state_dict.items():
        for i in ("1", "2"):
            if key.endswith(f".ls{i}.gamma"):
                key = key[: -len(f"ls{i}.gamma")] + f"gamma_{i}"
        out[key] = value
    return out
