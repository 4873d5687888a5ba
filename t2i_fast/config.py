"""One flat, typed training configuration with named presets per method.

The CLI flags are generated from the fields below (name, type, default and help), so adding a field here
is all it takes to expose it. Unknown keys in a config file or preset are rejected.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UserError

def opt(default: Any, help: str, **kw):
    """A dataclass field carrying its CLI help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def base_type(annotation) -> type:
    """int | None -> int; 'float | None' (a string under postponed annotations) -> float."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"__builtins__": __builtins__})  # field types are builtins only
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0]
    return annotation


def field_kinds(cls) -> dict[str, tuple[type, bool]]:
    """{field: (its type, whether None is allowed)} of a dataclass whose field types are builtins or X | None."""
    return {f.name: (base_type(f.type), "None" in str(f.type)) for f in fields(cls)}


EXPECTED = {bool: "a bool (true or false)", int: "an int (a whole number)", float: "a finite number", str: "a string"}


def fits(value, kind: type, optional: bool) -> bool:
    """Whether a config value has its field's type exactly: a bool for bool (not "no" or 1), an int for int
    (not 10.5 or true), a finite int or float for float, a string (or path) for str."""
    if value is None:
        return optional
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int subclass: true is not 1 step
        return False
    if kind is int:
        return isinstance(value, numbers.Integral)
    if kind is float:
        return isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and math.isfinite(value))
    if kind is str:
        return isinstance(value, (str, os.PathLike))
    return True


def check_types(values: dict[str, Any], kinds: dict[str, tuple[type, bool]], source: str | None = None) -> None:
    """A UserError naming the first value of the wrong type: as `source: key = value` (a file, a preset), or
    as the flag `--key value` where no source is given."""
    for key, value in values.items():
        kind, optional = kinds[key]
        if not fits(value, kind, optional):
            shown = f"{source}: {key} = {value!r}" if source else f"--{key.replace('_', '-')} {value!r}"
            raise UserError(f"{shown} must be {EXPECTED.get(kind, kind.__name__)}"
                            f"{' (or left out)' if optional else ''}; fix the value")


def check_token(token: str, flag: str = "--token") -> None:
    if not token.strip():
        raise UserError(f"{flag} is empty; pass a new identifier such as '<sks>'")


@dataclass
class TrainConfig:
    # --- what to train on
    model: str | None = opt(None, "local diffusers folder or single-file .safetensors checkpoint; default: the bundled model")
    images: str | None = opt(None, "folder of concept images (png/jpg/jpeg/webp); default: a bundled example concept")
    method: str = opt("lora", "personalization method (methods/__init__.py lists them)")
    token: str | None = opt(None, "identifier of the new concept in prompts (default: <sks>, or the example concept's own token when --images is not given)")
    class_word: str = opt("", "class noun of the concept, e.g. 'dog'")
    initializer: str | None = opt(None, "word whose embedding initialises new token vectors (default: the class word)")
    num_vectors: int = opt(1, "number of embedding vectors for the new token (textual inversion)")
    template: str | None = opt(None, "prompt template with {token} and {cls}; default: the method's template list")
    concepts: str | None = opt(None, "JSON list of {images, token, class_word, class_images | class_prompt} for multi-concept training")
    class_images: str | None = opt(None, "folder of class images for prior preservation (captions in NAME.txt beside each image)")
    class_prompt: str | None = opt(None, "prompt that generates class images with the base model when --class-images is not given")
    num_class_images: int = opt(50, "class images to generate from --class-prompt (cached on disk and reused)")
    prior_loss_weight: float = opt(1.0, "weight of the class (prior-preservation) loss")
    out: str = opt("runs/t2i-fast", "output folder")
    overwrite: bool = opt(False, "replace an output folder that already holds a finished run")

    # --- images
    resolution: int | None = opt(None, "training resolution in pixels (multiple of 8); default: the model's native size")
    center_crop: bool = opt(True, "center crop (otherwise random crops, a fixed set of them when latents are cached)")
    random_flip: bool = opt(True, "random horizontal flips")
    crop_variants: int = opt(4, "random-crop variants cached per image when center_crop is off")
    buckets: bool = opt(False, "aspect-ratio bucketing: crop each image to the bucket (width, height; multiples of 64, of 8 below 256 px; area at most resolution^2) nearest its aspect instead of a square; each batch holds one bucket (not with custom_diffusion)")

    # --- optimisation
    max_steps: int | None = opt(None, "number of optimizer steps, the cap when early stopping is on (default: the method's)")
    batch_size: int | None = opt(None, "images per micro-batch (default 1)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float | None = opt(None, "learning rate (default: the method's)")
    lr_schedule: str = opt("constant", "constant | cosine | linear (after warm-up)")
    warmup_steps: int = opt(0, "linear warm-up steps")
    optimizer: str = opt("adamw", "adamw | adamw8bit | paged_adamw8bit | sgd")
    adam_beta1: float = opt(0.9, "Adam beta1")
    adam_beta2: float = opt(0.999, "Adam beta2")
    adam_eps: float = opt(1e-8, "Adam epsilon")
    weight_decay: float | None = opt(None, "decoupled weight decay (default: the method's)")
    max_grad_norm: float = opt(1.0, "gradient norm clip (0 disables)")
    snr_gamma: float | None = opt(None, "min-SNR loss weighting gamma (e.g. 5.0); off by default")
    seed: int = opt(0, "random seed (training is deterministic on the CPU for a given seed)")

    # --- method details
    lora_rank: int = opt(4, "LoRA rank")
    lora_alpha: float | None = opt(None, "LoRA alpha (default: the rank, i.e. scale 1)")
    lora_init: str = opt("kaiming", "LoRA: how A starts (B starts at zero either way): kaiming (uniform, peft's default) | gaussian (normal, std 1/rank, as diffusers' train_dreambooth_lora.py)")
    train_text_encoder: bool = opt(False, "LoRA: also train LoRA on the text encoder's attention")
    train_token: bool = opt(False, "LoRA: add the token to the vocabulary and train its embedding (pivotal tuning)")
    token_lr: float | None = opt(None, "learning rate of trained token embeddings (default: --lr; 5e-3 for LoRA pivotal tuning)")
    init_embeddings: str | None = opt(None, "learned_embeds.safetensors whose tokens are added to the vocabulary, frozen, before training (lora, dreambooth)")
    stage1_steps: int | None = opt(None, "two_stage: textual-inversion steps of stage 1 (default: the method's; --max-steps is not used)", methods=("two_stage",))
    stage1_lr: float | None = opt(None, "two_stage: learning rate of stage 1 (default: the method's)", methods=("two_stage",))
    stage2_steps: int | None = opt(None, "two_stage: UNet fine-tuning steps of stage 2 (default: the method's)", methods=("two_stage",))
    stage2_lr: float | None = opt(None, "two_stage: learning rate of stage 2 (default: the method's; e.g. 5e-6 with --stage2-unet full)", methods=("two_stage",))
    stage2_unet: str = opt("lora", "two_stage: stage 2 trains a UNet LoRA (lora) or the whole UNet (full)", methods=("two_stage",))

    domain: str | None = opt(None, "e4t: the pre-trained domain, the folder (or its e4t_domain.safetensors) that `t2i-fast pretrain-e4t` wrote; default with the bundled model: its shipped toy domain", methods=("e4t",))
    image_encoder: str | None = opt(None, "e4t: the CLIP vision folder the domain was pre-trained with (pretrain-e4t --image-encoder), where it has moved since; default: the folder the domain file records", methods=("e4t",))

    freeze_model: str = opt("crossattn_kv", "custom_diffusion: train cross-attention to_k/to_v (crossattn_kv) or also to_q/to_out (crossattn)", methods=("custom_diffusion",))
    compress_svd: float = opt(0.0, "custom_diffusion: also save the deltas SVD-compressed, keeping the top singular values up to this fraction of their sum (e.g. 0.6; 0: off)", methods=("custom_diffusion",))

    # --- speed and memory switches
    cache_latents: bool = opt(True, "encode every image with the VAE once, before training")
    cache_text: bool = opt(True, "encode every prompt once when the text encoder is frozen")
    kernels: bool = opt(True, "use the fused kernels (off: plain PyTorch twins)")
    mixed_precision: str = opt("auto", "auto | no | fp16 | bf16 (auto: bf16/fp16 on CUDA, fp32 on the CPU)")
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the UNet")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    vram: str | None = opt(None, "device memory budget, e.g. 8GB: before loading any weights, plan the run's peak memory and switch on caching, the 8-bit optimizer and gradient checkpointing, in that order, until it fits (`t2i-fast plan` prints the plan)")

    # --- early stopping (stopping.py, probe.py); None: the method's preset in stopping.PRESETS
    early_stop: str | None = opt(None, "dvar (stop when the fixed-batch loss plateaus) | none (train to --max-steps) | few (stop after --few-steps); default: the method's (dvar; none for e4t, whose few steps are its budget)")
    dvar_window: int | None = opt(None, "DVAR window N in steps (default: the method's, e.g. 440 for LoRA, 310 for TI)")
    dvar_threshold: float | None = opt(None, "DVAR threshold alpha: stop when var(last N) / var(all) < alpha (default: the method's; 0 never stops)")
    probe_every: int = opt(0, "evaluate the fixed-batch loss every k steps, the window becoming N/k values (0: auto, k = N // 12)")
    probe_graph: bool = opt(True, "capture the probe as a CUDA graph where possible (off: always eager)")
    few_steps: int | None = opt(None, "step budget of --early-stop few (default: the method's)")
    save_best: bool = opt(False, "also save the adapter at the lowest fixed-batch loss into OUT/best")

    # --- bookkeeping
    checkpoint_every: int = opt(0, "write a resumable checkpoint every N steps (0: only at the end)")
    resume: bool = opt(False, "continue from the last checkpoint in the output folder")
    log_every: int = opt(1, "write a JSONL log line every N steps")
    num_samples: int = opt(4, "images in the final sample grid (0: none)")
    sample_steps: int = opt(20, "denoising steps for the sample grid")
    sample_prompt: str | None = opt(None, "prompt of the sample grid (default: 'a photo of {token} {cls}')")
    progress: bool = opt(True, "show a progress bar")
    evaluate: bool = opt(True, "score the run with the toy evaluator (subject/prompt fidelity, preservation) when it trains the bundled model")

    def __post_init__(self):
        # a value of the wrong type would otherwise pass silently ("no" is a true bool, 10.5 steps train 11)
        check_types(self.__dict__, field_kinds(TrainConfig))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | None = None) -> "TrainConfig":
        """source: where the values come from, for errors (a preset); None: flags, named as --flag."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise UserError(f"{source or 'config'}: unknown key(s) {', '.join(unknown)}; "
                            f"valid keys are the fields of TrainConfig (see `t2i-fast train --help`)")
        check_types(values, field_kinds(cls), source)
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Named configurations for a model family (SD 1.5 at 512 px, SDXL at 1024 px) and a method: conveniences over the method's own
# defaults (its class, methods/*.py), which apply to every field a preset leaves out.
PRESETS: dict[str, dict[str, Any]] = {
    "sd15-lora": dict(method="lora", resolution=512, lr=1e-4, lora_rank=4, max_steps=1000),
    "sd15-ti": dict(method="textual_inversion", resolution=512, lr=5e-3, max_steps=6100, weight_decay=0.0),
    "sd15-lora-lowvram": dict(method="lora", resolution=512, lr=1e-4, lora_rank=4, max_steps=1000,
                              gradient_checkpointing=True, optimizer="adamw8bit"),
    "sd15-custom-diffusion": dict(method="custom_diffusion", resolution=512, token="<new1>", lr=8e-5, batch_size=8,
                                  max_steps=500),
    "sd15-dreambooth": dict(method="dreambooth", resolution=512, lr=5e-6, max_steps=1000, prior_loss_weight=1.0),
    "sd15-dreambooth-lowvram": dict(method="dreambooth", resolution=512, lr=5e-6, max_steps=1000,
                                    prior_loss_weight=1.0, gradient_checkpointing=True, optimizer="adamw8bit",
                                    cache_latents=True),
    "sd15-two-stage": dict(method="two_stage", resolution=512, stage1_steps=500, stage1_lr=5e-3,
                           stage2_steps=500, stage2_lr=1e-4, lora_rank=4),
    # SDXL base models at 1024 px, after diffusers' SDXL examples: train_dreambooth_lora_sdxl.py's README (lr 1e-4,
    # 500 steps), textual_inversion_sdxl.py's (lr 5e-4 scaled by --scale_lr over batch 1 x 4 accumulated = 2e-3,
    # 500 steps), and DreamBooth's lr with the memory switches a full SDXL UNet needs on one card
    "sdxl-lora": dict(method="lora", resolution=1024, lr=1e-4, lora_rank=4, max_steps=500),
    "sdxl-lora-lowvram": dict(method="lora", resolution=1024, lr=1e-4, lora_rank=4, max_steps=500,
                              gradient_checkpointing=True, optimizer="adamw8bit"),
    "sdxl-ti": dict(method="textual_inversion", resolution=1024, lr=2e-3, max_steps=500, weight_decay=0.0),
    "sdxl-dreambooth-lowvram": dict(method="dreambooth", resolution=1024, lr=5e-6, max_steps=1000,
                                    prior_loss_weight=1.0, gradient_checkpointing=True, optimizer="adamw8bit",
                                    cache_latents=True),
}


def read_toml_or_json(path: Path, what: str, holding: str) -> Any:
    """The data of a .toml or .json file; a one-line UserError naming `what` ("config file") and what it
    should hold where it is missing, misnamed or not valid."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; pass an existing .toml or .json file with {holding}")
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(path.read_text())
        if path.suffix == ".json":
            return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid {path.suffix[1:]} ({e}); fix the file") from None
    raise UserError(f"{what} {path} must end in .toml or .json")


def add_config_flags(parser, skip: tuple[str, ...] = (), helps: dict[str, str] | None = None) -> None:
    """TrainConfig's fields as command-line flags (`t2i-fast train`, `plan`, `train-many`), minus `skip`; only
    the flags given reach args (SUPPRESS), so files and presets underneath keep their values. helps: a help
    text per field that config cannot write itself (the method names come from the registry above it)."""
    import argparse

    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag, kind = "--" + f.name.replace("_", "-"), base_type(f.type)
        shown = f.default if f.default is not dataclasses.MISSING else "-"
        help_text = (helps or {}).get(f.name, f.metadata.get("help", "")) + f" [default: {shown}]"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text,
                                metavar=f.name.upper())


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a .toml or .json config file into a dict (keys are TrainConfig fields)."""
    path = Path(path)
    data = read_toml_or_json(path, "config file", "TrainConfig keys")
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a table/object of TrainConfig keys")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(TrainConfig.field_names()) - {"preset"})
    if unknown:
        raise UserError(f"config file {path}: unknown key(s) {', '.join(unknown)}; "
                        f"see `t2i-fast train --help` for valid keys")
    check_types(data, {**field_kinds(TrainConfig), "preset": (str, True)}, f"config file {path}")
    return data


def resolve_config(explicit: dict[str, Any], preset: str | None = None) -> TrainConfig:
    """Merge, lowest to highest priority: field defaults < preset < explicit values.

    Fields left None stay None here: they are filled first with what the bundled model and concept need (e.g.
    its learning rate; app.with_bundled_defaults), then with the method's defaults (methods.with_defaults)."""
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if preset and preset.startswith("sd15") and explicit.get("model") is None:
        # its 512 px on the bundled 32 px model would run for hours
        raise UserError(f"--preset {preset} is for Stable Diffusion 1.5 models at 512 px; pass --model with an SD "
                        f"1.5 folder, or drop --preset to train the bundled model")
    preset_values = PRESETS.get(preset, {}) if preset else {}
    method = explicit.get("method", preset_values.get("method", TrainConfig.method))
    foreign = foreign_option(set(preset_values) - set(explicit), method)  # set by the preset for its own method
    if foreign:
        name, owners = foreign
        raise UserError(f"--preset {preset} sets --{name.replace('_', '-')} {preset_values[name]} for --method "
                        f"{' / '.join(owners)}, which --method {method} does not use; drop --method {method}, or "
                        f"choose another preset")
    return TrainConfig.from_dict({**preset_values, **explicit})


# Ranges the optimizer or the training loop would otherwise refuse only after the output folder exists, or
# never (a NaN gradient clip, a negative min-SNR gamma): checked with the rest of the options.
POSITIVE = ("lr", "token_lr", "stage1_lr", "stage2_lr", "adam_eps", "lora_alpha", "snr_gamma")
NON_NEGATIVE = ("weight_decay", "max_grad_norm", "prior_loss_weight", "seed", "checkpoint_every", "warmup_steps",
                "num_samples")
AT_LEAST_ONE = ("max_steps", "batch_size", "grad_accum", "num_vectors", "lora_rank", "log_every", "sample_steps",
                "crop_variants", "num_class_images", "stage1_steps", "stage2_steps")
BELOW_ONE = ("adam_beta1", "adam_beta2")  # Adam's decay rates: in [0, 1)


def check_values(cfg: TrainConfig) -> None:
    """A UserError naming the first option outside its meaningful range (types are checked on construction)."""
    check_types(cfg.__dict__, field_kinds(TrainConfig))  # fields assigned after construction
    check_token(cfg.token or "")
    if cfg.buckets and cfg.resolution is not None:  # a native resolution is checked once the model is loaded
        from .buckets import check_resolution

        check_resolution(cfg.resolution)
    rules = [(POSITIVE, lambda v: v > 0, "positive"), (NON_NEGATIVE, lambda v: v >= 0, "0 or more"),
             (AT_LEAST_ONE, lambda v: v >= 1, "at least 1"), (BELOW_ONE, lambda v: 0 <= v < 1, "in [0, 1)")]
    for names, ok, wanted in rules:
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not ok(value):
                raise UserError(f"--{name.replace('_', '-')} {value} must be {wanted}"
                                f"{'; leave it out for the default' if FIELD_DEFAULTS[name] is None else ''}")


FIELD_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def check_method_options(cfg: TrainConfig) -> None:
    """A UserError for an option that only other methods read (the `methods` of its field), set away from its
    default: --domain with --method lora would otherwise be silently ignored. Checked where a run is asked for
    (t2i_fast.train, train-many), not per Trainer: two_stage's stages carry their own stage's settings."""
    foreign = foreign_option({f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != f.default}, cfg.method)
    if foreign:
        name, owners = foreign
        raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is an option of --method "
                        f"{' / '.join(owners)}, which --method {cfg.method} does not use; leave it out, or train "
                        f"with --method {owners[0]}")


def foreign_option(names, method: str) -> tuple[str, tuple[str, ...]] | None:
    """The first of the TrainConfig fields `names` that only other methods than `method` read (the `methods`
    of its field), with those methods; None where there is none."""
    for f in fields(TrainConfig):
        owners = f.metadata.get("methods")
        if owners and f.name in names and method not in owners:
            return f.name, owners
    return None
