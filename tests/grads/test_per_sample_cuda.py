"""Device checks (skipped without CUDA): same numbers as on the CPU, no host syncs."""

import pytest
import torch
from grad_problems import LAYER_PROBLEMS, PROBLEMS, mlp_problem

import functrain as ft
from functrain import tree
from functrain.testing import assert_trees_all_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda(x):
    return tree.map(lambda t: t.cuda(), x)


def test_per_sample_and_clipped_sum_match_cpu():
    loss_fn, params, batch = mlp_problem(7)
    cpu = ft.per_sample_grads(loss_fn, params, batch, chunk_size=3)
    gpu = ft.per_sample_grads(loss_fn, _cuda(params), _cuda(batch), chunk_size=3)
    assert_trees_all_close(gpu, cpu, rtol=1e-9, atol=1e-12)
    c_cpu = ft.clipped_grad_sum(loss_fn, params, batch, 0.5, chunk_size=2)
    c_gpu = ft.clipped_grad_sum(loss_fn, _cuda(params), _cuda(batch), 0.5, chunk_size=2)
    assert_trees_all_close(c_gpu.grad_sum, c_cpu.grad_sum, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", LAYER_PROBLEMS)
def test_layers_method_and_ghost_clipping_match_cpu_without_host_syncs(name):
    loss_fn, params, batch = PROBLEMS[name]()
    cpu = ft.per_sample_grads(loss_fn, params, batch, method="layers")
    c_cpu = ft.clipped_grad_sum(loss_fn, params, batch, 0.05, method="layers")
    params, batch = _cuda(params), _cuda(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = ft.per_sample_grads(loss_fn, params, batch, method="layers")
        c_gpu = ft.clipped_grad_sum(loss_fn, params, batch, 0.05, method="layers")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_trees_all_close(gpu, cpu, rtol=1e-9, atol=1e-12)
    assert_trees_all_close(c_gpu.grad_sum, c_cpu.grad_sum, rtol=1e-9, atol=1e-12)
    assert int(c_gpu.num_clipped) == int(c_cpu.num_clipped)


def test_dp_noise_and_noise_scale_without_host_syncs():
    params = {"w": torch.zeros(64, 32, device="cuda"), "b": torch.zeros(32, device="cuda")}
    tx = ft.chain(ft.dp_noisy_mean(1.0, 1.1, 16, seed=0), ft.sgd(0.1, momentum=0.9))
    state = tx.init(params)
    ns = ft.noise_scale_init("cuda")
    grads = [tree.map(lambda p, i=i: p + i + 1.0, params) for i in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        updates, state = tx.update(params, state, params)
        sq = [tree.norm(g, squared=True) for g in grads]
        combined = tree.scale(1 / 3, tree.add(*grads))
        est = ft.noise_scale_estimate(sq, [1, 1, 1], tree.norm(combined, squared=True))
        ns, metrics = ft.noise_scale_metrics(ns, est)
        acc = ft.cosine_accumulator_init(params)
        for g, s in zip(grads, sq):
            acc = ft.cosine_accumulator_add(acc, g, s)
        metrics["cos"] = ft.mean_pairwise_cosine(acc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.device.type == "cuda" for v in metrics.values())
    # The counter-based noise is the same on the CPU (up to rounding of log/cos).
    cpu_tx = ft.chain(ft.dp_noisy_mean(1.0, 1.1, 16, seed=0), ft.sgd(0.1, momentum=0.9))
    cpu_params = tree.map(lambda t: t.cpu(), params)
    cpu_updates, _ = cpu_tx.update(cpu_params, cpu_tx.init(cpu_params), cpu_params)
    assert_trees_all_close(updates, cpu_updates, rtol=1e-4, atol=1e-6)
