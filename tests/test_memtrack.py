"""memtrack.TensorMemory counts the bytes of the storages a block creates, from birth to free."""
import gc

import torch

from t2i_fast.memtrack import TensorMemory, resident_bytes

MB = 1000 * 1000 * 4  # bytes of a 1000 x 1000 fp32 tensor


def test_counts_creation_views_and_frees():
    with TensorMemory() as mem:
        a = torch.ones(1000, 1000)
        view = a[:500].t()  # a view: no new storage
        b = a * 2
        assert mem.live == 2 * MB
        del b
        gc.collect()
        assert mem.live == MB
        c = torch.empty(2000, 1000)
    assert mem.peak == 3 * MB  # a and c, after b was freed; b's moment (2) was lower
    assert view.untyped_storage().nbytes() == MB and c.numel() == 2 * 10**6


def test_backward_and_preexisting_tensors():
    w = torch.randn(1000, 1000, requires_grad=True)  # before the block: not counted
    x = torch.randn(1000, 1000)
    with TensorMemory() as mem:
        loss = (x @ w).relu().sum()  # saved for backward: x (pre-existing) and relu's output
        assert mem.live == MB + 4  # relu's output + the scalar; x @ w was freed once relu had run
        loss.backward()
    assert w.grad is not None
    # peak: relu output, the loss, then in backward the grad of relu (1), of x @ w (1) and w.grad (1) overlap
    assert 2 * MB < mem.peak <= 4 * MB + 8
    del loss
    gc.collect()
    assert mem.live == MB  # w.grad, which outlives the block


def test_resident_bytes_counts_shared_storage_once():
    a = torch.zeros(10, 10)
    assert resident_bytes([a, a[1:], a.t()]) == 400
    assert resident_bytes([a, torch.zeros(5, dtype=torch.float16)]) == 410
