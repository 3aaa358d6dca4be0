"""Rank layout and process groups (docs/design.md: global = pp*(dp*tp) + dp*tp + tp)."""

import pytest
import torch.distributed as dist

from dist_harness import run_distributed
from megaglot.config import ConfigError
from megaglot.parallel import state


def _members(group):
    ranks = [None] * dist.get_world_size(group)
    dist.all_gather_object(ranks, dist.get_rank(), group=group)
    return ranks


def _layout_worker(rank):
    out = {}
    for tp, pp, vp in ((2, 2, 2), (4, 1, None), (1, 8, None)):
        s = state.initialize(tp, pp, vp)
        record = dict(tp_rank=s.tp_rank, pp_rank=s.pp_rank, dp_rank=s.dp_rank, dp_size=s.dp_size,
                      tp=_members(s.tp_group), pp=_members(s.pp_group), dp=_members(s.dp_group),
                      mp=_members(s.mp_group), first=state.is_pipeline_first_stage(),
                      last=state.is_pipeline_last_stage(),
                      next=state.get_pipeline_next_rank(), prev=state.get_pipeline_prev_rank())
        if vp:
            record["first_virtual_1"] = state.is_pipeline_first_stage(virtual_rank=1)
            record["last_virtual_1"] = state.is_pipeline_last_stage(virtual_rank=1)
            record["first_virtual_0"] = state.is_pipeline_first_stage(virtual_rank=0)
            record["last_virtual_0"] = state.is_pipeline_last_stage(virtual_rank=0)
        out[(tp, pp)] = record
        state.destroy()
    try:
        state.initialize(3, 1)
    except ConfigError as e:
        out["error"] = str(e)
    return out


def test_rank_layout_and_groups_on_8_ranks():
    results = run_distributed(_layout_worker, 8)
    for (tp, pp) in ((2, 2), (4, 1), (1, 8)):
        dp = 8 // (tp * pp)
        for rank, res in enumerate(results):
            r = res[(tp, pp)]
            p, d, t = rank // (dp * tp), (rank // tp) % dp, rank % tp
            assert (r["pp_rank"], r["dp_rank"], r["tp_rank"], r["dp_size"]) == (p, d, t, dp)
            assert r["tp"] == [p * dp * tp + d * tp + i for i in range(tp)]
            assert r["dp"] == [p * dp * tp + i * tp + t for i in range(dp)]
            assert r["pp"] == [i * dp * tp + d * tp + t for i in range(pp)]
            assert sorted(r["mp"]) == sorted(i * dp * tp + d * tp + j for i in range(pp) for j in range(tp))
            assert r["first"] == (p == 0) and r["last"] == (p == pp - 1)
            assert r["next"] == r["pp"][(p + 1) % pp] and r["prev"] == r["pp"][(p - 1) % pp]
    # Interleaved: chunk 1 of 2 is the first of no stage, the last of the last; chunk 0 the reverse.
    for rank, res in enumerate(results):
        r = res[(2, 2)]
        assert r["first_virtual_1"] is False
        assert r["last_virtual_1"] == (r["pp_rank"] == 1)
        assert r["first_virtual_0"] == (r["pp_rank"] == 0) and r["last_virtual_0"] is False
        assert "world size 8 is not divisible by TP x PP = 3 x 1 = 3" in res["error"]
        assert "[1, 2, 4, 8]" in res["error"]


@pytest.mark.parametrize("world,tp,pp,message", [
    (8, 3, 1, "world size 8 is not divisible"),
    (4, 0, 1, "tensor_parallel size must be a positive integer"),
    (4, 1, -2, "pipeline_parallel size must be a positive integer"),
])
def test_check_layout_errors(world, tp, pp, message):
    with pytest.raises(ValueError, match=message):
        state.check_layout(world, tp, pp)


def test_initialize_requires_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        state.initialize(1, 1)


def test_parallel_config_errors_name_the_flag():
    from megaglot.config import ModelConfig, ParallelConfig

    model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=1000,
                        make_vocab_size_divisible_by=8)
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 3 does not divide --num-attention-heads 4"):
        ParallelConfig(tensor_model_parallel_size=3).validate(model)
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 3 does not divide --num-layers 4"):
        ParallelConfig(pipeline_model_parallel_size=3).validate(model)
    with pytest.raises(ConfigError, match="needs --pipeline-model-parallel-size > 1"):
        ParallelConfig(num_layers_per_virtual_pipeline_stage=1).validate(model)
    with pytest.raises(ConfigError, match=r"not divisible by --pipeline-model-parallel-size x "):
        ParallelConfig(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=3).validate(model)
    with pytest.raises(ConfigError, match="world size 6 is not divisible by TP x PP = 2 x 2"):
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).validate(model, 6)


def test_vocab_padding_is_a_property_of_the_model():
    from megaglot.config import ModelConfig, ParallelConfig, get_model_preset

    cfg = get_model_preset("polyglot-ko-1.3b")
    assert cfg.padded_vocab_size == 30080
    for tp in (1, 2, 4, 5, 8, 10, 16, 20, 32, 40, 64):
        ParallelConfig(tensor_model_parallel_size=tp).validate(
            ModelConfig(num_layers=2, hidden_size=1280, num_attention_heads=320, ffn_hidden_size=2560))
    odd = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=3, ffn_hidden_size=96,
                      vocab_size=30003)
    with pytest.raises(ConfigError, match="does not divide the padded vocabulary 30080.*--make-vocab-size-divisible-by 384"):
        ParallelConfig(tensor_model_parallel_size=3).validate(odd)
