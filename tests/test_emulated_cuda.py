"""The CUDA emulator that checks GPU code paths here, and the index builders under it: the same index as
on the CPU, built without a host read of a device value."""

import pytest
import torch

from fastctx.kernels import sparse
from fastctx.kernels.sparse import block_mask_index, vertical_slash_index
from tests.emulated_cuda import cpu_values, emulated_cuda, to_cuda


def test_the_emulator_records_host_reads_and_refuses_mixed_devices():
    x = to_cuda(torch.arange(6.0))
    with emulated_cuda() as mode:
        y = (x * 2)[1:]
        assert y.is_cuda and torch.zeros(2, device="cuda").is_cuda
        assert int(y.max()) == 10 and y.tolist()[0] == 2.0
        y[y > 4]
        y.cpu()
        with pytest.raises(RuntimeError, match="CUDA would refuse"):
            y + torch.ones(5)
        assert (y + torch.tensor(1.0)).is_cuda  # a 0-d CPU tensor is a scalar, as on CUDA
    assert [r.split(": ", 1)[1].split(" ")[0] for r in mode.round_trips] == [
        "int()", ".tolist()", "indexing", "aten._to_copy.default"]


def _same_index(device, cpu):
    """The same reads; the device's index may have more (empty) range slots: it makes room for as many
    as there can be, where the CPU counts them."""
    width = cpu.ranges.shape[2]
    ranges = cpu_values(device.ranges)
    assert torch.equal(ranges[:, :, :width], cpu.ranges) and (ranges[:, :, width:] == sparse._EMPTY).all()
    assert torch.equal(cpu_values(device.cols), cpu.cols)


@pytest.mark.parametrize("q_len,prefix", [(200, 0), (130, 77)])
def test_vertical_slash_index_on_a_device_matches_the_cpu_without_host_reads(q_len, prefix):
    g = torch.Generator().manual_seed(0)
    keys = prefix + q_len
    vertical = torch.randint(0, keys, (3, 9), generator=g)
    slash = torch.randint(0, keys, (3, 14), generator=g)
    want = vertical_slash_index(vertical, slash, q_len, prefix, 64)
    with emulated_cuda() as mode:
        got = vertical_slash_index(to_cuda(vertical), to_cuda(slash), q_len, prefix, 64)
    assert not mode.round_trips, mode.round_trips
    _same_index(got, want)


def test_vertical_slash_index_reads_the_width_back_only_past_the_memory_cap(monkeypatch):
    monkeypatch.setattr(sparse, "SLASH_SLOTS_WITHOUT_READ", 0)
    g = torch.Generator().manual_seed(1)
    vertical, slash = torch.randint(0, 300, (2, 5), generator=g), torch.randint(0, 300, (2, 20), generator=g)
    want = vertical_slash_index(vertical, slash, 300, 0, 64)
    with emulated_cuda() as mode:
        got = vertical_slash_index(to_cuda(vertical), to_cuda(slash), 300, 0, 64)
    assert [r.split(": ")[1] for r in mode.round_trips] == ["int() of a device tensor ()"] * 2  # 64 rows, then 44
    _same_index(got, want)


@pytest.mark.parametrize("seed", range(3))
def test_block_mask_index_on_a_device_matches_the_cpu_without_host_reads(seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(3, 5, 9, generator=g) < 0.4
    want = block_mask_index(mask, 32, 150, 130)
    with emulated_cuda() as mode:
        got = block_mask_index(to_cuda(mask), 32, 150, 130)
    assert not mode.round_trips, mode.round_trips
    assert got.ranges.shape[2] == 5  # ceil(9 key blocks / 2)
    _same_index(got, want)
