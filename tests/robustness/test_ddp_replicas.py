"""tests/robustness/ddp_replicas.py, the check that DDP keeps the weights of every rank identical. Here without
torchrun: the other rank's digests are handed in by a stand-in for the all-gather. The torchrun
tests of train_ae.py and train_dit.py run the check for real."""

import copy

import pytest
import torch

from support import common
import ddp_replicas


def two_nets():
    """A small model and a copy that differs from it in the lowest bit of one weight."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    other = copy.deepcopy(net)
    with torch.no_grad():
        w = other[0].weight
        w[2, 3] = torch.nextafter(w[2, 3], torch.tensor(1.0))
    return net, other


def test_the_digest_tells_apart_weights_one_bit_apart():
    net, other = two_nets()
    assert ddp_replicas.digest(net) == ddp_replicas.digest(copy.deepcopy(net))
    assert ddp_replicas.digest(net) != ddp_replicas.digest(other)


@pytest.mark.parametrize("rank", [0, 1])
def test_equal_ranks_pass_and_a_difference_stops_the_run(monkeypatch, capsys, rank):
    net, other = two_nets()
    dist = common.Dist(True, rank, rank, 2, torch.device("cpu"), rank == 0)

    def gather_with(theirs):  # the all-gather of 2 ranks, the other one holding `theirs`
        def gather(out, mine):
            out[rank], out[1 - rank] = mine, [ddp_replicas.digest(m) for m in theirs]
        return gather

    monkeypatch.setattr(ddp_replicas.torch_dist, "all_gather_object", gather_with([copy.deepcopy(net), net]))
    ddp_replicas.check_replicas(dist, 5, net, net)
    assert capsys.readouterr().out == ("weights identical on all 2 ranks at step 5\n" if rank == 0 else "")
    monkeypatch.setattr(ddp_replicas.torch_dist, "all_gather_object", gather_with([net, other]))  # the EMA differs
    with pytest.raises(AssertionError, match="weights differ between ranks at step 5"):
        ddp_replicas.check_replicas(dist, 5, net, net)
