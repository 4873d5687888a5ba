"""The closed-form Custom Diffusion merge: Ŵ Cᵀ = Vᵀ holds, other captions stay near the base model, the
merged folder loads, and runs that cannot be merged are refused with one line and nothing written."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from t2i_fast import TrainConfig
from t2i_fast.errors import UserError
from t2i_fast.merge import REG_CAPTIONS, ConstrainedMerge, constrained_merge, token_features
from t2i_fast.cd_files import CD_FILE, cross_attention_modules

KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight"


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_constraint_holds_and_other_captions_stay_put():
    g = torch.Generator().manual_seed(0)
    dim, out = 32, 48
    scales = torch.logspace(0, -1.5, dim, dtype=torch.float64)   # caption features: anisotropic
    C_reg, held = _rand(g, 600, dim) * scales, _rand(g, 200, dim) * scales
    C = _rand(g, 10, dim)                                         # concept rows point elsewhere too
    W0 = _rand(g, out, dim)
    W1, W2 = W0 + 0.3 * _rand(g, out, dim), W0 + 0.3 * _rand(g, out, dim)
    VT = torch.cat([W1 @ C[:5].T, W2 @ C[5:].T], dim=1)
    W = constrained_merge(W0, C, VT, C_reg, ridge=0.0)
    assert ((W @ C.T - VT).abs().max() / VT.abs().max()) < 1e-9
    # the minimum-Frobenius-norm solution satisfies the constraint too, but moves the captions more
    W_min = W0 + torch.linalg.solve(C @ C.T, (VT - W0 @ C.T).T).T @ C
    assert ((W - W0) @ C_reg.T).norm() <= ((W_min - W0) @ C_reg.T).norm()

    def dev(M):
        return float(((M - W0) @ held.T).norm() / (W0 @ held.T).norm())

    assert dev(W) < 0.5 * min(dev(W1), dev(W2)) and dev(W) < dev(W_min), (dev(W), dev(W1), dev(W_min))


def test_ill_conditioned_systems_are_named():
    g = torch.Generator().manual_seed(1)
    C_reg = _rand(g, 300, 16)
    dup = _rand(g, 3, 16)
    with pytest.raises(UserError, match="ill-conditioned.*d Cᵀ.*identical"):
        ConstrainedMerge(torch.cat([dup, dup[:1]]), C_reg)
    with pytest.raises(UserError, match="ill-conditioned.*C_regᵀ C_reg"):
        ConstrainedMerge(dup, C_reg[:, :8] @ _rand(g, 8, 16), ridge=0.0)  # captions span 8 of 16 dims
    with pytest.raises(UserError, match="constraint rows"):
        ConstrainedMerge(_rand(g, 20, 16), C_reg)


def test_fingerprint_tolerates_precision_not_other_models():
    import copy

    from t2i_fast.cd_files import base_fingerprint, same_base
    from t2i_fast.testing import build_pipeline

    unet = build_pipeline("tiny", 0).unet
    sig = base_fingerprint(unet)
    assert same_base(sig, base_fingerprint(copy.deepcopy(unet).to(torch.bfloat16)))
    assert same_base(sig, base_fingerprint(copy.deepcopy(unet).half()))
    assert not same_base(sig, base_fingerprint(build_pipeline("tiny", 1).unet))


@pytest.fixture(scope="module")
def two_runs(tiny_model, concept_dir, tmp_path_factory):
    from t2i_fast.testing import write_concept_images
    from t2i_fast import train

    root = tmp_path_factory.mktemp("merge")
    cat = write_concept_images(root / "cat-images", n=2, size=64, seed=3)  # not the run folder root/cat
    runs = []
    for images, word in ((concept_dir, "dog"), (cat, "cat")):  # both <new1>: the merge renames the second
        cfg = TrainConfig(model=str(tiny_model), images=str(images), class_word=word, token="<new1>",
                          method="custom_diffusion", out=str(root / word), resolution=32, max_steps=2, lr=3e-2,
                          crop_variants=1, num_samples=0, progress=False, early_stop="none")
        runs.append(train(cfg).out)
    return root, runs


def test_merge_end_to_end(two_runs, tiny_model):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from t2i_fast.cli import main
    from t2i_fast.sampling import load_adapter

    root, (dog, cat) = two_runs
    captions = REG_CAPTIONS.read_text().splitlines()
    (root / "reg.txt").write_text("\n".join(captions[:300]))
    out = root / "merged"
    assert main(["merge", str(dog), str(cat), "--out", str(out), "--reg-captions", str(root / "reg.txt")]) == 0
    report = json.loads((out / "merge.json").read_text())
    assert report["tokens"] == [{"<new1>": "<new1>"}, {"<new1>": "<new2>"}]
    assert report["max_rel_residual"] < 1e-8

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    base_unet = {k: a.to_k.weight.detach().double() for k, a in cross_attention_modules(pipe.unet).items()}
    assert load_adapter(pipe, out) == [CD_FILE, "<new1>.safetensors", "<new2>.safetensors"]
    merged, w_dog, w_cat = (load_file(p / CD_FILE) for p in (out, dog, cat))
    tok, te = pipe.tokenizer, pipe.text_encoder
    rows = {t: token_features(tok, te, [p], set(tok.convert_tokens_to_ids([t])))
            for t, p in (("<new1>", "a photo of <new1> dog"), ("<new2>", "a photo of <new2> cat"))}
    for key in (KEY, KEY.replace("to_k_", "to_v_")):  # Ŵ c = W_n c on each concept's rows
        W = merged[key].double()
        torch.testing.assert_close(W @ rows["<new1>"].T, w_dog[key].double() @ rows["<new1>"].T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(W @ rows["<new2>"].T, w_cat[key].double() @ rows["<new2>"].T, rtol=1e-4, atol=1e-5)
    # held-out captions (not in --reg-captions): the merge moves them less than the runs themselves do
    held = token_features(tok, te, captions[300:340])
    W0 = base_unet[KEY.rsplit(".", 2)[0]]

    def dev(W):
        return float(((W.double() - W0) @ held.T).norm() / (W0 @ held.T).norm())

    assert dev(merged[KEY]) < max(dev(w_dog[KEY]), dev(w_cat[KEY])), (dev(merged[KEY]), dev(w_dog[KEY]))


def _rewrite(src, dst, change_meta=None, change_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    with safe_open(str(src / CD_FILE), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta.update(change_meta or {})
    tensors.update(change_tensors or {})
    save_file(tensors, str(dst / CD_FILE), metadata=meta)
    return dst


@pytest.mark.parametrize("case", ["base_model", "shape", "missing", "q_out", "exists"])
def test_merge_refuses(case, two_runs, tmp_path, capsys):
    from t2i_fast.cli import main

    root, (dog, cat) = two_runs
    out = tmp_path / "out"
    if case == "base_model":
        from safetensors import safe_open

        with safe_open(str(cat / CD_FILE), "pt") as f:
            sig = json.loads(f.metadata()["t2i_fast.base_fingerprint"])
        other = _rewrite(cat, tmp_path / "other", {"t2i_fast.base_fingerprint": json.dumps([x * 1.1 for x in sig])})
        runs, expect = [dog, other], "different base model"
    elif case == "shape":
        other = _rewrite(cat, tmp_path / "other", change_tensors={KEY: torch.zeros(5, 7)})
        runs, expect = [dog, other], "shape"
    elif case == "missing":
        runs, expect = [dog, tmp_path / "nope"], "does not exist"
    elif case == "q_out":
        key = KEY.replace("to_k_", "to_q_")
        runs, expect = [_rewrite(dog, tmp_path / "q", change_tensors={key: torch.zeros(32, 32)})], "K/V only"
    else:
        out.mkdir()
        runs, expect = [dog, cat], "already exists"
    assert main(["merge", *map(str, runs), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("error:") and expect in err[0], err
    assert list(tmp_path.glob("out.tmp*")) == []
    assert not out.exists() or case == "exists"
