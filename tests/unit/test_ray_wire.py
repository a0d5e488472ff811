"""What crosses between the Ray driver and its actors (lampo.distributed.ray.wire): tensors as NumPy
arrays, which Ray's serialiser passes out of band, and back equal, bit for bit."""

from __future__ import annotations

import io
import pickle

import torch

from lampo.distributed.ray.wire import WireBatch, from_wire, pack_weights, to_wire, unpack_weights
from lampo.optimize.batch import Sampling, TrainBatch
from lampo.rollout.batch import RolloutBatch


def _rollout_batch() -> RolloutBatch:
    return RolloutBatch(
        input_ids=torch.tensor([[5, 6, 7, 0], [5, 8, 9, 10]]), attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        action_mask=torch.tensor([[False, True, True, False], [False, True, False, True]]),
        engine_logprobs=torch.tensor([[0.0, -0.5, -1.25, 0.0], [0.0, -2.0, 0.0, -0.75]]),
        turn_spans=[[(1, 3)], [(1, 2), (3, 4)]], finish_reasons=[["stop"], ["length", "stop"]],
        messages=[["hi", "yo"], ["a", "b", "c", "d"]], prompt_index=torch.tensor([3, 3]), policy_version=7,
        versions=torch.tensor([7, 8]), skipped_rows=1, cut_at_max_prompt_len=2)


def _train_batch() -> TrainBatch:
    b = _rollout_batch()
    return TrainBatch(input_ids=b.input_ids, attention_mask=b.attention_mask, action_mask=b.action_mask,
                      placed_scores=torch.tensor([[0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, -1.0]]),
                      seq_scores=torch.tensor([0.5, -1.0]), stopped=torch.tensor([True, False]), group_size=2,
                      engine_logprobs=None, sampling=Sampling(0.7, 5, 0.9), policy_version_lag=1)


def _tensors_in(obj) -> list:
    """Every torch tensor pickle meets in `obj` (what Ray would pickle through torch's reducer)."""
    found = []

    class Spy(pickle.Pickler):
        def reducer_override(self, o):
            if isinstance(o, torch.Tensor):
                found.append(o)
            return NotImplemented

    Spy(io.BytesIO()).dump(obj)
    return found


def test_a_rollout_batch_crosses_as_arrays_and_comes_back_equal_and_writable():
    sent = _rollout_batch()
    wire = to_wire(sent)
    assert len(_tensors_in(sent)) == 6  # the spy sees tensors where there are some
    assert isinstance(wire, WireBatch) and _tensors_in(wire) == []
    back = from_wire(pickle.loads(pickle.dumps(wire)))
    assert type(back) is RolloutBatch
    for name in (*RolloutBatch.TENSORS, "versions"):
        got, want = getattr(back, name), getattr(sent, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    for name in ("turn_spans", "finish_reasons", "messages", "policy_version", "skipped_rows",
                 "cut_at_max_prompt_len"):
        assert getattr(back, name) == getattr(sent, name), name
    back.input_ids[0, 0] = 99  # the reader's own copy: the learner may write to its batch
    assert sent.input_ids[0, 0] == 5


def test_a_train_batch_keeps_its_none_fields_and_its_sampling():
    sent = _train_batch()
    back = from_wire(pickle.loads(pickle.dumps(to_wire(sent))))
    assert type(back) is TrainBatch
    for name in ("input_ids", "attention_mask", "action_mask", "placed_scores", "seq_scores", "stopped"):
        got, want = getattr(back, name), getattr(sent, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert back.engine_logprobs is None
    assert (back.group_size, back.sampling, back.policy_version_lag) == (2, Sampling(0.7, 5, 0.9), 1)


def test_a_bare_tensor_and_plain_values_cross_too():
    lp = torch.tensor([[-0.5, -1.5]], dtype=torch.bfloat16)
    back = from_wire(pickle.loads(pickle.dumps(to_wire(lp))))
    assert back.dtype == torch.bfloat16 and torch.equal(back, lp)
    assert from_wire(to_wire({"loss": 1.0})) == {"loss": 1.0}
    assert from_wire(to_wire(None)) is None


def test_weights_travel_as_arrays_and_come_back_equal_in_every_dtype():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    weights = [("a", base), ("b", base.t()), ("c", base.to(torch.bfloat16)), ("d", base.to(torch.float16)),
               ("e", torch.tensor([1.5e38, -3.0e-39, float("inf")], dtype=torch.bfloat16))]
    packed = pack_weights(iter(weights))
    assert [(name, dtype) for name, _, dtype in packed] == [("a", "float32"), ("b", "float32"), ("c", "bfloat16"),
                                                            ("d", "float16"), ("e", "bfloat16")]
    back = unpack_weights(packed)
    assert [name for name, _ in back] == ["a", "b", "c", "d", "e"]
    for (_, sent), (_, got) in zip(weights, back, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got, sent)  # bit for bit, bf16's pattern included

