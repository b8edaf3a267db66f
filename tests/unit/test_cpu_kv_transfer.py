"""The pure-torch HiCache copy kernels the CPU engine gets from runtime_patches.cpu.fixes."""

from __future__ import annotations

import torch

from runtime_patches.cpu.fixes import (
    transfer_kv_all_layer_direct_lf_pf,
    transfer_kv_direct,
    transfer_kv_per_layer_direct_pf_lf,
)

LAYERS, HEADS, DIM, PAGE = 3, 2, 4, 4


def _device(slots: int) -> list[torch.Tensor]:
    """K layers then V layers, each [slots, heads, dim], every value distinct."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(slots, HEADS, DIM, generator=g) for _ in range(2 * LAYERS)]


def test_device_to_page_first_direct_puts_each_token_in_its_page_and_layer() -> None:
    device = _device(16)
    host = [torch.zeros(5, LAYERS, PAGE, HEADS, DIM) for _ in range(2)]  # 5 pages
    device_idx = torch.tensor([3, 4, 5, 6, 9, 10, 11, 12])
    host_idx = torch.tensor([8, 9, 10, 11, 16, 17, 18, 19])  # pages 2 and 4
    transfer_kv_all_layer_direct_lf_pf(device, host, device_idx, host_idx, PAGE)
    for which in range(2):
        for layer in range(LAYERS):
            for d, h in zip(device_idx.tolist(), host_idx.tolist(), strict=True):
                assert torch.equal(host[which][h // PAGE, layer, h % PAGE],
                                   device[which * LAYERS + layer][d])
    untouched = [0, 1, 3]
    assert not host[0][untouched].any() and not host[1][untouched].any()


def test_page_first_direct_round_trip_equals_a_layer_first_copy() -> None:
    device = _device(16)
    host = [torch.zeros(4, LAYERS, PAGE, HEADS, DIM) for _ in range(2)]
    idx = torch.arange(0, 8)
    host_idx = torch.arange(4, 12)
    transfer_kv_all_layer_direct_lf_pf(device, host, idx, host_idx, PAGE)
    back = [torch.zeros(16, HEADS, DIM) for _ in range(2 * LAYERS)]
    dest = torch.arange(8, 16)
    for layer in range(LAYERS):
        transfer_kv_per_layer_direct_pf_lf(host, [back[layer], back[LAYERS + layer]], host_idx,
                                           dest, layer, PAGE)
    expected = [torch.zeros(16, HEADS, DIM) for _ in range(2 * LAYERS)]
    transfer_kv_direct(device, expected, idx, dest, PAGE)
    for got, want in zip(back, expected, strict=True):
        assert torch.equal(got, want)


def test_layer_count_mismatch_is_an_error() -> None:
    try:
        transfer_kv_all_layer_direct_lf_pf(_device(4)[:5], [torch.zeros(1, 1, 1, 1, 1)] * 2,
                                           torch.tensor([0]), torch.tensor([0]), 1)
    except ValueError as exc:
        assert "do not split" in str(exc)
    else:
        raise AssertionError("expected ValueError")
