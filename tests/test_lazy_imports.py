"""bitsandbytes, which diffusers imports eagerly, loads only when something uses it (lazy_imports.py)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("bitsandbytes")


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_bitsandbytes_loads_on_first_use_only():
    out = run("""
        import sys
        from t2i_fast.models import set_offline
        from t2i_fast.lazy_imports import is_loaded
        set_offline()
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel
        import bitsandbytes
        print(is_loaded("bitsandbytes"), "bitsandbytes.functional" in sys.modules, bitsandbytes.__file__ is not None)
        import bitsandbytes.functional as F
        print(is_loaded("bitsandbytes"), callable(F.optimizer_update_8bit_blockwise), bitsandbytes.optim.AdamW8bit.__name__)
    """)
    assert out.splitlines() == ["False False True", "True True AdamW8bit"]


def test_the_bitsandbytes_optimizer_trains_after_a_deferred_import():
    out = run("""
        import torch
        from t2i_fast.models import set_offline
        set_offline()
        import diffusers  # imports bitsandbytes, deferred
        from t2i_fast.optim import AdamW8bit
        w = torch.nn.Parameter(torch.ones(4096))
        opt = AdamW8bit([w], lr=0.1, backend="bnb")
        (w * w).sum().backward()
        opt.step()
        print(bool((w < 1).all()))
    """)
    assert out == "True"



def test_loading_a_lora_through_diffusers_leaves_bitsandbytes_unloaded(base_cfg, tiny_model, tmp_path):
    """diffusers' load_lora_weights goes through peft, whose LoRA module asks bitsandbytes about 4-bit layers at
    import; adapter_files.load_lora_weights answers for it while bitsandbytes is deferred. The LoRA changes the
    image exactly as in a process where bitsandbytes was loaded first."""
    import numpy as np

    from t2i_fast import train

    run_dir = train(base_cfg.replace(max_steps=2, lr=1e-2, early_stop="none")).out
    outputs = {}
    for first in ("", "import bitsandbytes.functional"):
        path = tmp_path / f"image{len(outputs)}.npy"
        outputs[first] = run(f"""
            import numpy as np, torch
            from t2i_fast.models import set_offline
            from t2i_fast.lazy_imports import is_loaded
            set_offline()
            {first}
            from diffusers import StableDiffusionPipeline
            from t2i_fast.adapter_files import load_lora_weights
            pipe = StableDiffusionPipeline.from_pretrained({str(tiny_model)!r}, safety_checker=None)
            load_lora_weights(pipe, {str(run_dir)!r})
            image = pipe("a photo of <sks> dog", num_inference_steps=2, height=32, width=32, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images[0]
            np.save({str(path)!r}, image)
            print(is_loaded("bitsandbytes"), any("lora" in n for n, _ in pipe.unet.named_modules()))
        """), np.load(path)
    (deferred, image), (loaded, image_loaded) = outputs.values()
    assert deferred == "False True" and loaded == "True True"
    np.testing.assert_array_equal(image, image_loaded)


def test_a_submodule_imported_first_runs_once(tmp_path):
    """`import pkg.sub` as the first use of a deferred pkg whose own code imports pkg.sub: pkg.sub runs once, and
    the caller, the package and sys.modules hold the same module (loading pkg from its `__path__` once ran
    pkg.sub a second time, leaving two copies)."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "runs.py").write_text("names = []\n")
    (tmp_path / "pkg" / "__init__.py").write_text("import runs\nruns.names.append('pkg')\nfrom . import sub\n")
    (tmp_path / "pkg" / "sub.py").write_text("import runs\nruns.names.append('sub')\n")
    (tmp_path / "pkg" / "other.py").write_text("import runs\nruns.names.append('other')\n")
    out = run(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import runs
        from t2i_fast.lazy_imports import defer, is_loaded
        print(defer("pkg"))
        import pkg
        print(is_loaded("pkg"), pkg.__path__ is not None, runs.names)
        import pkg.sub as sub
        print(runs.names, sub is pkg.sub is sys.modules["pkg.sub"], sub.__spec__.name)
        import pkg.other
        print(runs.names)
    """)
    assert out.splitlines() == ["True", "False True []", "['pkg', 'sub'] True pkg.sub", "['pkg', 'sub', 'other']"]
