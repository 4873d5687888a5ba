"""Custom Diffusion's closed-form multi-concept merge: `t2i-fast merge RUN1 RUN2 ... --out DIR`.

For every cross-attention K/V weight (out, in), with W0 the base weight and W_n run n's:

    minimise   || (W - W0) C_regᵀ ||_F        (stay close to the base on ordinary captions)
    subject to  W Cᵀ = Vᵀ,  V = rows W_n c for each row c of concept n's features

    d = C (C_regᵀ C_reg)⁻¹           (rows, in)
    Ŵ = W0 + (Vᵀ − W0 Cᵀ)(d Cᵀ)⁻¹ d     so  Ŵ Cᵀ = Vᵀ exactly.

C_reg: text features of every token (start token dropped) of a list of ordinary captions (the bundled
assets/reg_captions.txt, or --reg-captions FILE). C: for each concept's training prompts, the features from
its modifier token through the end-of-text token. The start token's K/V were never trained (detached),
and the text before the modifier is the same for every concept (identical rows with different targets
would make the system singular), so both are left to the regularisation term. d and the factorisation of
d Cᵀ depend only on the text, so they are computed once and every layer costs two triangular solves.
Everything is solved in float64 (never an explicit inverse); an ill-conditioned system is an error
that says why, not a silently wrong merge.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import formats, run_folder
from .errors import UserError
from .cd_files import (CD_FILE, base_fingerprint, cross_attention_modules, group_state, placeholders, same_base,
                       token_file)

REG_CAPTIONS = Path(__file__).with_name("assets") / "reg_captions.txt"
MERGEABLE = ("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight")
RIDGE = 1e-6     # relative to the mean eigenvalue of C_regᵀ C_reg; 0 for the exact textbook form
MAX_COND = 1e12  # float64 solves lose ~log10(cond) of 16 digits; past 1e12 the constraint no longer holds


@dataclass
class Run:
    folder: Path
    weights: dict[str, torch.Tensor]      # diffusers keys -> trained weight
    fingerprint: list[float]
    model: str | None
    concepts: list[dict]                  # {token, class_word, prompts}
    vectors: dict[str, torch.Tensor]      # token -> (1, dim)


def read_cd_run(folder: str | os.PathLike) -> Run:
    folder = Path(folder).expanduser()
    path = folder / CD_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass folders of finished `--method custom_diffusion` runs")
    tensors, meta = formats.read_safetensors(path)
    weights = {k: v for k, v in tensors.items() if v.numel() > 0}
    group_state(weights, path)  # checks the keys
    if "t2i_fast.base_fingerprint" not in meta or "t2i_fast.concepts" not in meta:
        raise UserError(f"{path} was not written by t2i-fast (no base model fingerprint or concept prompts); "
                        f"retrain it with `t2i-fast train --method custom_diffusion`")
    config = json.loads(meta.get("t2i_fast.config", "{}"))
    concepts = json.loads(meta["t2i_fast.concepts"])
    vectors = {}
    for c in concepts:
        tpath = folder / token_file(c["token"])
        if not tpath.is_file():
            raise UserError(f"{tpath} is missing; the run {folder} is incomplete: copy its token file back or retrain")
        if formats.load_textual_inversion_sdxl(tpath) is not None:
            raise UserError(f"{folder} is a Custom Diffusion run on an SDXL model; merge supports SD 1.x/2.x runs "
                            f"only: load SDXL runs one at a time with t2i-fast sample --adapter")
        token, vec = formats.load_textual_inversion(tpath)
        vectors[c["token"]] = vec
    return Run(folder, weights, json.loads(meta["t2i_fast.base_fingerprint"]), config.get("model"), concepts, vectors)


def check_runs(runs: list[Run]) -> None:
    """Same base model, same layers and shapes, only K/V trained: otherwise a UserError naming the file."""
    first = runs[0]
    for run in runs[1:]:
        if not same_base(run.fingerprint, first.fingerprint):
            raise UserError(f"{run.folder / CD_FILE} was trained from a different base model than "
                            f"{first.folder / CD_FILE} (model {run.model} vs {first.model}); merge only runs made "
                            f"from the same base model")
        if run.weights.keys() != first.weights.keys():
            extra = sorted(set(run.weights) ^ set(first.weights))[0]
            raise UserError(f"{run.folder / CD_FILE} and {first.folder / CD_FILE} train different layers "
                            f"(e.g. {extra}); merge runs made with the same model and --freeze-model")
        for k, v in run.weights.items():
            if v.shape != first.weights[k].shape:
                raise UserError(f"{run.folder / CD_FILE}: {k} has shape {tuple(v.shape)}, "
                                f"{tuple(first.weights[k].shape)} in {first.folder / CD_FILE}; merge runs of one "
                                f"base model")
    for run in runs:
        other = sorted(k for k in run.weights if not k.endswith(MERGEABLE))
        if other:
            raise UserError(f"{run.folder / CD_FILE} also trains {other[0].rsplit('.', 2)[-2]} (--freeze-model "
                            f"crossattn); the closed-form merge applies to K/V only: merge crossattn_kv runs")


def assign_tokens(runs: list[Run]) -> list[dict[str, str]]:
    """Per run, {old token: merged token}: kept when unique, else the next free <newK>."""
    used, mapping = set(), []
    taken = {c["token"] for r in runs for c in r.concepts}
    k = 1
    for run in runs:
        m = {}
        for c in run.concepts:
            token = c["token"]
            if token in used:
                while f"<new{k}>" in used or f"<new{k}>" in taken:
                    k += 1
                token = f"<new{k}>"
            used.add(token)
            m[c["token"]] = token
        mapping.append(m)
    return mapping


@torch.no_grad()
def token_features(tokenizer, text_encoder, prompts: list[str], from_ids: set[int] | None = None) -> torch.Tensor:
    """(rows, dim) float64 text features: per prompt, the tokens after the start token through the first
    end-of-text token; with `from_ids`, only from the first occurrence of one of those ids on."""
    from .data import tokenize

    rows = []
    eos = tokenizer.eos_token_id
    for prompt in prompts:
        ids = tokenize(tokenizer, [prompt])
        feats = text_encoder(ids.to(text_encoder.device))[0][0].double().cpu()   # (L, dim)
        ids = ids[0].tolist()
        end = ids.index(eos, 1) + 1 if eos in ids[1:] else len(ids)
        start = 1
        if from_ids is not None:
            hits = [i for i in range(1, end) if ids[i] in from_ids]
            if not hits:
                raise UserError(f"prompt {prompt!r} does not contain its concept's token; fix the prompt")
            start = hits[0]
        rows.append(feats[start:end])
    return torch.cat(rows)


def check_condition(matrix: torch.Tensor, what: str, why: str) -> float:
    cond = float(torch.linalg.cond(matrix))
    if not cond < MAX_COND:
        raise UserError(f"the merge system is ill-conditioned: {what} has condition number {cond:.3g} "
                        f"(> {MAX_COND:.0e}); {why}")
    return cond


class ConstrainedMerge:
    """The text-only part of the closed form, factorised once: C (rows, in), C_reg (n, in), float64."""

    def __init__(self, C: torch.Tensor, C_reg: torch.Tensor, ridge: float = RIDGE):
        C, C_reg = C.double(), C_reg.double()
        if C.shape[0] > C.shape[1]:
            raise UserError(f"the merge has {C.shape[0]} constraint rows for {C.shape[1]}-wide text features, so "
                            f"W Cᵀ = Vᵀ cannot hold; merge fewer concepts or use shorter prompts")
        gram = C_reg.T @ C_reg                                                  # (in, in), SPD
        self.cond_reg_raw = float(torch.linalg.cond(gram))
        self.warning = None
        if not self.cond_reg_raw < MAX_COND and ridge == 0:
            check_condition(gram, "C_regᵀ C_reg", "pass more, and more varied, captions with --reg-captions, or "
                            "a ridge (--ridge 1e-6)")
        if not self.cond_reg_raw < MAX_COND:
            self.warning = (f"C_regᵀ C_reg is singular to working precision (condition number "
                            f"{self.cond_reg_raw:.3g}): the caption features span only a subspace (a text encoder's "
                            f"final LayerNorm can do that); the ridge {ridge:g}·mean eigenvalue picks the solution")
        # ridge: also penalise changes along directions no caption spans (trace/n = mean eigenvalue)
        gram = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        self.cond_reg = check_condition(gram, "C_regᵀ C_reg", "pass more, and more varied, captions with "
                                        "--reg-captions (their tokens must span the text feature space)")
        self.d = torch.linalg.solve(gram, C.T).T                                # (rows, in) = C gram⁻¹
        dct = self.d @ C.T                                                      # (rows, rows)
        self.cond_dct = check_condition(dct, "d Cᵀ", "two concepts' prompts give (nearly) identical features; "
                                        "use distinct tokens or fewer prompts per concept")
        self.lu = torch.linalg.lu_factor(dct)
        self.C = C

    def __call__(self, W0: torch.Tensor, VT: torch.Tensor) -> torch.Tensor:
        """W0 (out, in), Vᵀ (out, rows) -> Ŵ (out, in) float64 with Ŵ Cᵀ = Vᵀ."""
        W0 = W0.double()
        R = VT.double() - W0 @ self.C.T                                          # (out, rows)
        # X (d Cᵀ) = R  <=>  (d Cᵀ)ᵀ Xᵀ = Rᵀ
        X = torch.linalg.lu_solve(*self.lu, R.T, adjoint=True).T
        return W0 + X @ self.d


def constrained_merge(W0: torch.Tensor, C: torch.Tensor, VT: torch.Tensor, C_reg: torch.Tensor,
                      ridge: float = RIDGE) -> torch.Tensor:
    """One layer: Ŵ = W0 + (Vᵀ − W0 Cᵀ)(d Cᵀ)⁻¹ d with d = C (C_regᵀ C_reg)⁻¹ (float64)."""
    return ConstrainedMerge(C, C_reg, ridge)(W0, VT)


def read_captions(path: str | os.PathLike | None) -> list[str]:
    path = Path(path).expanduser() if path else REG_CAPTIONS
    if not path.is_file():
        raise UserError(f"caption file {path} does not exist; pass a text file with one caption per line")
    captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not captions:
        raise UserError(f"caption file {path} holds no captions; write one caption per line")
    return captions


def merge_runs(run_dirs: list[str], out: str | os.PathLike, model: str | None = None,
               reg_captions: str | None = None, overwrite: bool = False, ridge: float = RIDGE) -> dict:
    """Merge Custom Diffusion runs into one adapter folder `out`; returns the merge report."""
    from .methods.tokens import add_token_set
    from .models import load_components

    if not run_dirs:
        raise UserError("merge needs at least one run folder: t2i-fast merge RUN1 RUN2 ... --out DIR")
    out = Path(out).expanduser()
    run_folder.check_writable(out)
    run_folder.refuse_overlap(out, [("merge input", r) for r in run_dirs])
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} already exists; pass --overwrite or choose another --out")
    run_folder.refuse_foreign(out)
    runs = [read_cd_run(r) for r in run_dirs]
    check_runs(runs)
    captions = read_captions(reg_captions)
    model = model or runs[0].model
    if not model:
        raise UserError(f"{runs[0].folder / CD_FILE} does not name its base model; pass --model DIR")
    comps = load_components(model)
    if not same_base(base_fingerprint(comps.unet), runs[0].fingerprint):
        raise UserError(f"model {model} is not the base model the runs were trained from; pass that model with --model")
    modules = cross_attention_modules(comps.unet)

    mapping = assign_tokens(runs)
    specs = [(new, 1, None) for m in mapping for new in m.values()]
    emb = add_token_set(comps.tokenizer, comps.text_encoder, specs, flag="merge token")
    with torch.no_grad():
        for run, m in zip(runs, mapping):
            for old, new in m.items():
                emb.new[emb.token_rows[new]] = run.vectors[old].float().reshape(1, -1)
    te = comps.text_encoder.eval()
    C_reg = token_features(comps.tokenizer, te, captions)
    blocks = []   # (run index, C_n)
    for n, (run, m) in enumerate(zip(runs, mapping)):
        for c in run.concepts:
            new = m[c["token"]]
            prompts = [p.replace(c["token"], new) for p in c["prompts"]]
            ids = set(comps.tokenizer.convert_tokens_to_ids([new]))
            blocks.append((n, token_features(comps.tokenizer, te, prompts, ids)))
    C = torch.cat([b for _, b in blocks])
    solver = ConstrainedMerge(C, C_reg, ridge)
    if solver.warning:
        print(f"warning: {solver.warning}", file=sys.stderr)

    merged, max_residual = {}, 0.0
    for key in runs[0].weights:
        proc_key, _, sub = key.partition(".processor.")
        attn = modules[proc_key + ".processor"]
        W0 = (attn.to_k if sub.startswith("to_k") else attn.to_v).weight.detach().double().cpu()
        VT = torch.cat([runs[n].weights[key].double() @ Cn.T for n, Cn in blocks], dim=1)
        W = solver(W0, VT)
        max_residual = max(max_residual, float((W @ C.T - VT).abs().max() / VT.abs().max().clamp(min=1e-12)))
        merged[key] = W.float()

    tokens = [new for m in mapping for new in m.values()]
    concepts = [{"token": m[c["token"]], "class_word": c["class_word"],
                 "prompts": [p.replace(c["token"], m[c["token"]]) for p in c["prompts"]]}
                for run, m in zip(runs, mapping) for c in run.concepts]
    report = {"runs": [str(r.folder) for r in runs], "model": str(model), "tokens": mapping,
              "constraint_rows": int(C.shape[0]), "reg_rows": int(C_reg.shape[0]),
              "reg_captions": str(Path(reg_captions).expanduser() if reg_captions else REG_CAPTIONS),
              "cond_reg_raw": solver.cond_reg_raw, "ridge": ridge, "cond_reg": solver.cond_reg,
              "cond_dct": solver.cond_dct, "max_rel_residual": max_residual}
    extra = {"base_fingerprint": runs[0].fingerprint, "tokens": tokens, "freeze_model": "crossattn_kv",
             "concepts": concepts, "merged_from": report["runs"]}
    meta = formats.adapter_metadata({"model": str(model), "method": "custom_diffusion"}, "custom_diffusion", extra)

    # everything into a temporary folder, then one rename: no half-written merge
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with run_folder.write_errors(out):
            tmp.mkdir(parents=True)
            formats.atomic_save({**merged, **placeholders(comps.unet)}, tmp / CD_FILE, meta)
            for run, m in zip(runs, mapping):
                for old, new in m.items():
                    formats.save_textual_inversion(tmp / token_file(new), new, run.vectors[old], None)
            (tmp / run_folder.MERGE_REPORT).write_text(json.dumps(report, indent=2))
            if run_folder.foreign_files(out):  # the user's files beside a previous merge stay
                run_folder.remove_ours(out)
                run_folder.replace_entries(tmp, out)
            else:
                run_folder.replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t2i-fast merge", description="Merge Custom Diffusion runs into one multi-concept adapter with "
        "the closed-form constrained merge (each concept's prompts keep their trained K/V outputs; other "
        "captions stay close to the base model).")
    parser.add_argument("runs", nargs="+", help="folders of finished --method custom_diffusion runs")
    parser.add_argument("--out", required=True, help="output folder of the merged adapter")
    parser.add_argument("--model", default=None, help="base model (default: the one the runs name)")
    parser.add_argument("--reg-captions", default=None,
                        help="text file, one caption per line, for the regularisation features "
                             "(default: the bundled list)")
    parser.add_argument("--ridge", type=float, default=RIDGE,
                        help=f"ridge added to C_regᵀ C_reg, times its mean eigenvalue [default: {RIDGE:g}]")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    report = merge_runs(args.runs, args.out, args.model, args.reg_captions, args.overwrite, args.ridge)
    tokens = ", ".join(f"{o}->{n}" if o != n else n for m in report["tokens"] for o, n in m.items())
    print(f"merged {len(report['runs'])} runs ({tokens}) into {args.out}; constraint residual "
          f"{report['max_rel_residual']:.2e}, cond(d Cᵀ) {report['cond_dct']:.2e}")
    return 0
