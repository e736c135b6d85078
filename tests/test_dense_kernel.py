import pytest
import torch

from fastctx.kernels import prefill_attention, reference_prefill_attention
from tests.helpers import random_qkv


def test_prefix_split_equals_unsplit_prefill():
    # A chunk after a cached prefix must equal the same rows of one whole prefill.
    q, k, v, kp, vp = random_qkv(9, 3, 300, 0, 64, torch.float32)
    whole = prefill_attention(q, k, v)
    tail = prefill_attention(q[:, 180:], k[:, 180:], v[:, 180:], k[:, :180], v[:, :180])
    torch.testing.assert_close(tail, whole[:, 180:], atol=1e-5, rtol=1e-5)


def test_reference_is_causal():
    # Changing a future key must not change earlier outputs.
    q, k, v, _, _ = random_qkv(2, 2, 10, 0, 16, torch.float32)
    before = reference_prefill_attention(q, k, v)
    k2 = k.clone()
    k2[:, 9] += 5
    after = reference_prefill_attention(q, k2, v)
    torch.testing.assert_close(after[:, :9], before[:, :9])
    assert not torch.allclose(after[:, 9], before[:, 9])


@pytest.mark.parametrize("bad", ["heads", "len", "dim"])
def test_shape_errors(bad):
    q, k, v, _, _ = random_qkv(9, 3, 8, 0, 64, torch.float32)
    if bad == "heads":
        k, v = k[:2], v[:2]
    elif bad == "len":
        k, v = k[:, :5], v[:, :5]
    else:
        q = q[..., :32]
    with pytest.raises(ValueError):
        prefill_attention(q, k, v)
