"""Forward-time ratio of our hand-written models to the reference implementations on the same weights and input.

    .venv/bin/python bench/bench_models.py              # full sizes: EF L1/L3/L7 and ViT-S/B at 224, SAM at 1024
    .venv/bin/python bench/bench_models.py --quick      # fewer repeats, SAM image encoder at 256
    .venv/bin/python bench/bench_models.py --device cuda --batch 32 --models efl7 vitb

Prints, per model, the median forward time of ours and of the reference (timm for EfficientFormer / ViT,
segment_anything for the SAM image encoder) in eval mode under torch.no_grad, and ours / reference (< 1 means
ours is faster). The two models are timed alternately so background load hits both alike. Not a test: timings
depend on the machine; the outputs are checked to agree before timing.
"""
import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import create_model, load_pretrained  # noqa: E402

TIMM_NAMES = {"efl1": "efficientformer_l1", "efl3": "efficientformer_l3", "efl7": "efficientformer_l7",
              "vits": "deit3_small_patch16_224", "vitb": "deit3_base_patch16_224"}


def build_pair(name: str, sam_size: int):
    """(ours, reference, input shape) with the reference's (perturbed) weights loaded into ours."""
    if name == "sam":
        from segment_anything.modeling import ImageEncoderViT
        ref = ImageEncoderViT(img_size=sam_size, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                              out_chans=256, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                              use_rel_pos=True, rel_pos_zero_init=True, window_size=14,
                              global_attn_indexes=(2, 5, 8, 11))
        sam = create_model("sam_vitb", img_size=sam_size)
        ours = sam.image_encoder
        ours.load_state_dict(ref.state_dict(), strict=True)
        return ours, ref, (3, sam_size, sam_size)
    import timm
    ref = timm.create_model(TIMM_NAMES[name], pretrained=False)
    ours = create_model(name)
    load_pretrained(ours, ref.state_dict(), verbose=False)
    return ours, ref, (3, 224, 224)


@torch.no_grad()
def time_pair(ours, ref, x, repeats: int, warmup: int) -> tuple[float, float, float]:
    for _ in range(warmup):
        ours(x), ref(x)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for model, times in ((ours, t_ours), (ref, t_ref)):
            sync()
            t = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t)
    diff = (ours(x) - ref(x)).abs().max().item()
    return statistics.median(t_ours), statistics.median(t_ref), diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["efl1", "efl3", "efl7", "vits", "vitb", "sam"],
                        help="which models: efl1 efl3 efl7 vits vitb sam")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warmup, SAM at 256 instead of 1024")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10, 3 with --quick)")
    parser.add_argument("--sam-size", type=int, default=None, help="SAM input side (default 1024, 256 with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = 1 if args.quick else 3
    sam_size = args.sam_size or (256 if args.quick else 1024)
    torch.manual_seed(0)

    print(f"device {args.device}, batch {args.batch}, {repeats} repeats, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<8} {'input':<14} {'ours ms':>9} {'ref ms':>9} {'ours/ref':>9} {'max|diff|':>10}")
    for name in args.models:
        ours, ref, shape = build_pair(name, sam_size)
        with torch.no_grad():  # move weights away from init (layer scales 1e-5/1e-6 make blocks near-identity)
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        ours.load_state_dict(ref.state_dict())
        ours, ref = ours.eval().to(args.device), ref.eval().to(args.device)
        x = torch.randn(args.batch, *shape, device=args.device)
        t_ours, t_ref, diff = time_pair(ours, ref, x, repeats, warmup)
        print(f"{name:<8} {'x'.join(map(str, x.shape)):<14} {t_ours * 1e3:9.1f} {t_ref * 1e3:9.1f} "
              f"{t_ours / t_ref:9.3f} {diff:10.2e}")
        del ours, ref


if __name__ == "__main__":
    main()
