"""The latent cache under data parallelism: encoded a share per rank and exchanged (the default), against its
plain twin in which every rank encodes every image x variant pair itself (T2I_FAST_SHARED_CACHE=0).

Each round starts W processes on the gloo backend (what torchrun starts on a CPU machine), each with the SD
VAE's real sizes (random weights, the same on every rank) and the same concept folder, and times
data.LatentCache from a barrier to the last rank done; the two sides alternate which goes first. Both sides'
caches must be equal (checked on rank 0 each round), so the ratio compares the same result.

  python bench/bench_latent_cache.py [--ranks 2] [--images 8] [--variants 2] [--resolution 128] [--rounds 3]

Reports the median over rounds of each side's time and the ratio shared / plain (< 1: sharing is faster).
Expect about 1/W plus the exchange where each rank has a core of its own; on a machine with fewer cores than
ranks the ranks share them and the gain shrinks.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate_sides, append_results, ratio_row, run_ranks, side_medians  # noqa: E402

SIDES = ("shared", "plain")


def build_cache(rank: int, side: str, args) -> dict:
    """One rank of one side: time data.LatentCache between a barrier and the end of the last rank's share."""
    os.environ["T2I_FAST_SHARED_CACHE"] = "1" if side == "shared" else "0"
    import torch
    import torch.distributed as td

    from t2i_fast import data
    from t2i_fast.data import ConceptImages, LatentCache
    from t2i_fast.testing import build_vae

    encodes = [0]  # how many pairs this rank encodes: what the switch changes
    encode = data.encode_distribution

    def counted(*a, **kw):
        encodes[0] += 1
        return encode(*a, **kw)

    data.encode_distribution = counted
    torch.set_num_threads(args.threads)
    vae = build_vae("mid", seed=0).eval().requires_grad_(False)
    images = ConceptImages(args.folder, args.resolution, center_crop=False, random_flip=args.variants > 1,
                           crop_variants=max(1, args.variants // 2), seed=0)
    td.barrier()
    start = time.perf_counter()
    with torch.no_grad():
        cache = LatentCache(images, vae)
    elapsed = torch.tensor([time.perf_counter() - start])
    td.all_reduce(elapsed, op=td.ReduceOp.MAX)  # the cache is ready when the last rank has it
    counts = [None] * td.get_world_size()
    td.all_gather_object(counts, encodes[0])
    return {"seconds": elapsed.item(), "pairs": len(images) * images.num_variants, "encodes": counts,
            "mean": cache.mean, "std": cache.std}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--variants", type=int, default=2, help="augmentation variants per image (crops x flips)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--csv", action="store_true", help="append the result to bench/results.csv")
    args = p.parse_args(argv)
    if args.ranks < 2 or args.variants < 1 or args.images < 1 or args.rounds < 1:
        p.error("--ranks must be at least 2, and --images, --variants and --rounds at least 1")

    import torch

    from t2i_fast.testing import write_concept_images

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.folder = str(write_concept_images(work / "concept", n=args.images, size=args.resolution))
        rounds = alternate_sides(
            args.rounds, SIDES, lambda side: run_ranks(build_cache, args.ranks, work, side, args),
            lambda a, b: all(torch.equal(x, y) for key in ("mean", "std") for x, y in zip(a[key], b[key])),
            lambda a, b: f"shared {a['seconds']:.2f} s, plain {b['seconds']:.2f} s ({a['pairs']} pairs, caches "
                         f"equal; encodes per rank: shared {a['encodes']}, plain {b['encodes']})")
    if rounds is None:
        return 1
    seconds = side_medians(rounds, "seconds")
    shared, plain = seconds["shared"], seconds["plain"]
    print(f"latent cache, {args.ranks} ranks, {args.images} images x {args.variants} variants at "
          f"{args.resolution} px, SD VAE sizes, {args.threads} thread(s) per rank: shared {shared:.2f} s, "
          f"plain twin {plain:.2f} s (medians of {args.rounds} rounds): shared / plain {shared / plain:.3f}")
    if args.csv:
        append_results([ratio_row("latent_cache", f"{args.ranks}ranks_{args.images}x{args.variants}_"
                                                  f"{args.resolution}px", "shared", "seconds", shared, plain, "s")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
