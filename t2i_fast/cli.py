"""t2i-fast: train | plan | sample | eval | merge | export.

`train` flags are generated from TrainConfig's fields (name, type, default, help): nothing is copied by
hand. Mistakes a user can fix print one line starting with "error:" and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from .errors import UserError
from .notices import quiet_kernels_community, quiet_torchvision_fallback

EPILOG = """examples:
  t2i-fast train                                   # the bundled model and example concept
  t2i-fast train --model ./sd15 --images ./dog --method lora --token "<sks>" --class-word dog --out ./run1
  t2i-fast sample --model ./sd15 --adapter ./run1 --prompt "a photo of <sks> dog on the beach" --n 4 --out ./imgs
  t2i-fast plan --model ./sd15 --preset sd15-lora-lowvram --vram 6GB   # peak memory, before a run
"""


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    from .config import add_config_flags
    from .methods import REGISTRY

    # the method names come from the registry, which config.py cannot import
    add_config_flags(parser, helps={"method": f"personalization method: {' | '.join(REGISTRY)}"})


def config_from_args(args):
    """The TrainConfig of `train`'s (and `plan`'s) flags, over --config's file, over --preset."""
    from .config import load_config_file, resolve_config

    values = {k: v for k, v in vars(args).items() if k not in ("func", "config", "preset", "command")}
    file_values = load_config_file(args.config) if args.config else {}
    file_preset = file_values.pop("preset", None)
    preset = args.preset or file_preset  # the flag over the file
    return resolve_config({**file_values, **values}, preset)


def cmd_train(args) -> int:
    from .app import train
    from .distributed import launched_main, shutdown

    result = train(config_from_args(args))
    shutdown()  # under torchrun / accelerate: every rank has its result; they leave the process group together
    if not launched_main():  # under torchrun / accelerate, rank 0 speaks for the run
        return 0
    print(f"trained {result.steps} steps in {result.wall_time:.1f} s, final loss {result.final_loss:.4f}; "
          f"wrote {', '.join(result.files)} to {result.out}")
    for line in summary_lines(result.report):
        print(line)
    return 0


def cmd_plan(args) -> int:
    from .app import with_bundled_defaults
    from .memplan import human
    from .methods import with_defaults
    from .recipe import plan_each_process

    processes = vars(args).pop("processes")  # plan's own flag, not a TrainConfig key
    if processes < 1:
        raise UserError(f"--processes {processes} must be at least 1 (the processes of torchrun / accelerate)")
    given = config_from_args(args)
    cfg = with_bundled_defaults(given)  # without --images the example concept's: images only shape the batch
    with warnings.catch_warnings():
        if given.images is None:  # the example's small images at the model's resolution are no concern here
            warnings.filterwarnings("ignore", message=".*smaller than the training", category=UserWarning)
        cfg, plan = plan_each_process(cfg, processes)
    batch = with_defaults(cfg).batch_size
    each = f" ({batch // processes} per process, {processes} processes)" if processes > 1 else ""
    print(f"memory plan of `t2i-fast train` for {cfg.method} on {cfg.model} at {cfg.resolution or 'native'} px, "
          f"batch {batch}{each}:")
    print(plan.table())
    if not cfg.vram:
        print(f"(give --vram to fit the run to a budget; this plan needs {human(plan.total)})")
    return 0


def summary_lines(report: dict) -> list[str]:
    """What the end of a run says besides its files: why it stopped, and the evaluator's scores."""
    lines = []
    stops = report.get("early_stop") or {}
    stops = stops.values() if "mode" not in stops else [stops]  # two_stage: one entry per stage
    for es in stops:
        if es and es.get("stopped_early"):
            lines.append(f"early stopping (DVAR): stopped at step {es['stop_step']} of {es['cap']} "
                         f"(r = {es['r_at_stop']:.3f} < {es['threshold']}); the probe took "
                         f"{100 * es['probe_fraction']:.1f}% of training time")
    scores = report.get("eval")
    if scores:
        lines.append(f"toy evaluator: subject fidelity {scores['subject_fidelity']:.3f}, prompt fidelity "
                     f"{scores['prompt_fidelity']:.2f}, preservation {scores['preservation']:.3f} (eval.json)")
    return lines


def cmd_sample(args) -> int:
    from .sampling import sample

    model = args.model
    if model is None:
        from .app import default_model

        model = default_model()
    adapters = args.adapter or [None]
    if len(adapters) > 1:  # several adapters: one batch, one UNet pass per step for all of them
        from .sampling import sample_many

        images = sample_many(model, adapters, args.prompt, n=args.n, seed=args.seed, steps=args.steps,
                             guidance=args.guidance, resolution=args.resolution, out=args.out, device=args.device,
                             batch=args.batch)
        print(f"wrote {len(images)} images ({args.n} per adapter) and grid.png to {args.out}")
        return 0
    if len(args.prompt) > 1:
        raise UserError(f"--prompt given {len(args.prompt)} times for one adapter; give it once (or pass one "
                        f"--adapter per prompt)")
    images = sample(model, adapters[0], args.prompt[0], n=args.n, seed=args.seed, steps=args.steps,
                    guidance=args.guidance, resolution=args.resolution, out=args.out, device=args.device,
                    batch=4 if args.batch is None else args.batch)
    print(f"wrote {len(images)} image{'s' if len(images) != 1 else ''} and grid.png to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    parser = argparse.ArgumentParser(
        prog="t2i-fast", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Personalize Stable Diffusion models fast, in little memory, stopping when the concept "
                    "is learned.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="teach a model a new concept from a folder of images",
                       description="Train an adapter (LoRA, textual inversion, ...) on a folder of images. "
                                   "Without --model/--images it personalizes the bundled model on a bundled "
                                   "example concept.", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EPILOG)
    p.add_argument("--config", help="a .toml or .json file of TrainConfig keys (flags override it)")
    p.add_argument("--preset", help=f"named preset: {', '.join(sorted(PRESETS))}")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="the peak device memory of a training run, before it starts; --vram fits it",
                       description="Estimate the peak device memory of `t2i-fast train` with the same flags, "
                                   "one row per component, without a GPU and without reading weights. With "
                                   "--vram 8GB, switch on what fits the run to the budget (cheapest first).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a .toml or .json file of TrainConfig keys (flags override it)")
    p.add_argument("--preset", help=f"named preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--processes", type=int, default=1,
                   help="plan one device of a data-parallel run of this many processes (torchrun / accelerate): "
                        "its share of --batch-size and the all-reduce's buffers")
    add_config_flags(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sample", help="generate images with a base model plus a trained adapter")
    p.add_argument("--model", default=None, help="base model folder (default: the bundled model)")
    p.add_argument("--adapter", action="append", default=None,
                   help="training output folder (any method); repeat it to sample several LoRA / Custom "
                        "Diffusion runs in one batch (n images each, files a<k>_..., one grid row per adapter)")
    p.add_argument("--prompt", action="append", required=True,
                   help='e.g. "a photo of <sks> dog on the beach"; with several --adapter: once for all, or '
                        'once per adapter in the same order')
    p.add_argument("--n", type=int, default=4, help="number of images [default: 4]")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i [default: 0]")
    p.add_argument("--steps", type=int, default=30, help="denoising steps [default: 30]")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale [default: 7.5]")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per UNet pass; lower it where memory runs out (default: 4 with one adapter, all "
                        "of them with several); the images are the same whatever it is, up to float rounding")
    p.add_argument("--device", default="cpu", help="cpu | cuda [default: cpu]")
    p.add_argument("--out", required=True, help="folder for the PNGs and grid.png")
    p.set_defaults(func=cmd_sample)

    for name, module, summary in EXTRA_COMMANDS:
        p = sub.add_parser(name, help=summary, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_delegate(module, name))
    return parser


# Commands whose arguments belong to their own module: (name, module with main(argv), summary)
EXTRA_COMMANDS: list[tuple[str, str, str]] = [
    ("export", "t2i_fast.export", "write a run's adapter in the kohya / A1111 layouts (ComfyUI, A1111 read them)"),
    ("eval", "t2i_fast.toy.evaluator",
     "score a run on the bundled toy world (fidelity, prompt fidelity, preservation)"),
    ("merge", "t2i_fast.merge", "merge Custom Diffusion runs into one multi-concept adapter (closed form)"),
    ("train-many", "t2i_fast.train_many", "train one adapter per concept of a TOML/JSON file, here or on Ray"),
    ("pretrain-e4t", "t2i_fast.e4t_pretrain", "pre-train E4T's encoder and offsets on a domain (then --method e4t)"),
]


def _delegate(module: str, name: str):
    def run(args) -> int:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"`t2i-fast {name}` is not available in this installation ({e})") from None
        return int(mod.main(args.rest) or 0)

    return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    delegated = {name: module for name, module, _ in EXTRA_COMMANDS}
    if argv and argv[0] in delegated:
        # their own parser gets their arguments untouched, in the user's order (--help included); this
        # parser would move a leading flag's value away from it
        args = argparse.Namespace(func=_delegate(delegated[argv[0]], argv[0]), rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .models import set_offline

    set_offline()  # before anything imports huggingface_hub (bitsandbytes' import would otherwise go online)
    quiet_torchvision_fallback()
    quiet_kernels_community()
    try:
        refuse_launcher(argv[0])
        return args.func(args)
    except UserError as e:
        from .launcher import launched_main

        if launched_main():  # every rank meets the same bad input; one line is enough
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the trainer has said where it stopped and how to resume
        return 130


def refuse_launcher(command: str) -> None:
    """Only `train` runs data parallel: any other command started by torchrun or accelerate would run once per
    process, every copy writing the same files."""
    from .launcher import launched_world

    if command != "train" and launched_world() > 1:
        raise UserError(f"`t2i-fast {command}` runs in one process; start it without torchrun or accelerate "
                        f"(only `t2i-fast train` runs data parallel; `train-many --ray` spreads concepts over GPUs)")


def console(argv: list[str] | None = None) -> int:
    """The `t2i-fast` command and `python -m t2i_fast.cli`: main() in a process of its own, which lets it tune
    Python's garbage collector for a short-lived process full of long-lived objects (command_gc.py). Code that
    runs the command line inside its own process (tests, scripts) calls main(), which leaves the collector alone."""
    from . import command_gc

    command_gc.for_a_command()
    code = main(argv)
    command_gc.exit_now(code)  # ends the process, except with T2I_FAST_GC=plain
    return code


if __name__ == "__main__":
    sys.exit(console())
