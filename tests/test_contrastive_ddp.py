"""ClipLoss under torch.distributed: 2 CPU processes (gloo) must reproduce the single-process loss on the full batch.

Per rank the feature gradient is ``world_size`` times the single-process one (DDP's gradient averaging divides it
back, see qlip.losses.contrastive); the test checks exactly that scaling, so a gather whose backward dropped the
other ranks' contributions, or summed the wrong slice, fails.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from qlip.losses.contrastive import ClipLoss

WORLD = 2
ROWS = 5  # per rank
DIM = 8
# (local_loss, gather_with_grad, chunk_size)
SETTINGS = [(False, True, None), (True, True, None), (False, True, 3), (True, True, 2), (False, False, None)]


def _global_batch():
    g = torch.Generator().manual_seed(123)
    img = F.normalize(torch.randn(WORLD * ROWS, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(WORLD * ROWS, DIM, generator=g, dtype=torch.float64), dim=-1)
    return img, txt, torch.tensor(11.0, dtype=torch.float64)


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A file store: no TCP store server on rank 0 that could go away while rank 1 still tears down (which made
    # gloo abort rank 1 now and then), and no port to race for.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD)
    try:
        img, txt, scale = _global_batch()
        results = []
        for local_loss, with_grad, chunk in SETTINGS:
            i = img[rank * ROWS : (rank + 1) * ROWS].clone().requires_grad_()
            t = txt[rank * ROWS : (rank + 1) * ROWS].clone().requires_grad_()
            s = scale.clone().requires_grad_()
            loss = ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, chunk_size=chunk)(i, t, s)
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results.append((loss.detach(), mean_loss / WORLD, i.grad, t.grad, s.grad))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears its connections down while the other is still in a collective (gloo aborts)
    finally:
        dist.destroy_process_group()
        gc.collect()  # free the group's last references (autograd nodes of the gathers) while Python is alive


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single_process():
    img, txt, scale = _global_batch()
    img.requires_grad_(), txt.requires_grad_(), scale.requires_grad_()
    loss = ClipLoss()(img, txt, scale)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, scale.grad


@pytest.mark.parametrize("index", range(len(SETTINGS)))
def test_gathered_loss_and_gradients_match_single_process(ddp_results, index):
    local_loss, with_grad, _ = SETTINGS[index]
    ref_loss, ref_img_grad, ref_txt_grad, ref_scale_grad = _single_process()
    scale_grads = []
    for rank in range(WORLD):
        loss, mean_loss, img_grad, txt_grad, scale_grad = ddp_results[rank][index]
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        # the mean over ranks is always the global loss; without local_loss every rank holds it exactly
        torch.testing.assert_close(mean_loss, ref_loss.float(), rtol=1e-6, atol=1e-6)
        if not local_loss:
            torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-6, atol=1e-6)
        if with_grad:
            # after DDP's average over ranks (/ WORLD), the rank's slice gets the single-process gradient rows
            torch.testing.assert_close(img_grad / WORLD, ref_img_grad[rows], rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(txt_grad / WORLD, ref_txt_grad[rows], rtol=1e-5, atol=1e-8)
        else:
            # constants for the other ranks: the full-matrix loss still gives this rank its exact rows
            torch.testing.assert_close(img_grad, ref_img_grad[rows], rtol=1e-5, atol=1e-8)
        scale_grads.append(scale_grad)
    torch.testing.assert_close(sum(scale_grads) / WORLD, ref_scale_grad, rtol=1e-5, atol=1e-8)
