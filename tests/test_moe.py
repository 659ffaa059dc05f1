"""Mixtures of experts against Hugging Face's own classes: Mixtral (top-k renormalized), Qwen2-MoE (a shared expert
behind a sigmoid gate), Qwen3-MoE (per-head QK-norm, renormalized here) and OLMoE (QK-norm over the whole
projection, which spans the ranks), tiny random checkpoints saved by transformers (the hf extra; skipped without
it), run by mpitp on 1 to 4 simulated ranks in both expert layouts, with expert counts that do not divide."""

import contextlib
import io

import numpy as np
import pytest

from mpitp import Trace, compare, generate_batch, generate_sequence, load_model
from mpitp.errors import ShardingError
from mpitp.experts import bytes_per_token, route
from mpitp.sharding import default_layout, shard_for
from threadcomm import run_ranks

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_families import PROMPT, hf_greedy, hf_logits  # noqa: E402 (needs torch)

COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=20, num_hidden_layers=3, max_position_embeddings=64,
              num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False)
FAMILIES = {  # experts: 6 over 4 ranks are 2, 2, 1, 1; 5 over 2, 3, 4 are 3 2, 2 2 1, 2 1 1 1; 7 over 3 are 3 2 2
    "mixtral": ("Mixtral", dict(num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2Moe", dict(num_experts=7, num_experts_per_tok=2, moe_intermediate_size=20,
                                   shared_expert_intermediate_size=36)),
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=20, head_dim=8,
                                   norm_topk_prob=True)),
    "olmoe": ("Olmoe", dict(num_experts=5, num_experts_per_tok=3)),
}


def hf_moe(name, path):
    prefix, extra = FAMILIES[name]
    torch.manual_seed(1)
    model = getattr(transformers, prefix + "ForCausalLM")(getattr(transformers, prefix + "Config")(**COMMON, **extra))
    model = model.double().eval()
    with torch.no_grad():  # norms away from 1, so that a norm applied wrongly (or over the wrong span) shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    model.set_experts_implementation("eager")  # the grouped kernel has no float64
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = hf_moe(request.param, path)
    return str(path), model


@pytest.mark.parametrize("layout", ["tensor", "expert"])
def test_logits_and_greedy_equal_hugging_face_in_both_layouts_at_every_rank_count(family, layout):
    path, model = family
    expected, greedy = hf_logits(model, PROMPT), hf_greedy(model, PROMPT, 8)
    for size in (1, 2, 3, 4):
        def run(c):
            m = load_model(path, c, "float64", experts=layout)
            logits = m.forward(PROMPT, m.new_cache(len(PROMPT)), all_logits=True)
            return m.shard.experts, logits, generate_sequence(m, PROMPT, 8).token_ids
        for experts, logits, tokens in run_ranks(size, run):
            # HF runs its norms, the router's softmax and RoPE's tables in float32: not closer than that.
            assert experts == layout
            assert np.abs(logits - expected).max() <= 1e-4, (size, np.abs(logits - expected).max())
            assert tokens == greedy, size


def test_each_rank_holds_its_block_of_whole_experts_or_its_columns_of_every_expert(family):
    path, model = family
    layer = model.model.layers[1].mlp.experts  # transformers 5 holds them fused: gate_up_proj [E, 2 F, n_embd]
    gate_up, down = layer.gate_up_proj.detach().numpy(), layer.down_proj.detach().numpy()
    n_expert, f = gate_up.shape[0], gate_up.shape[1] // 2
    for layout in ("tensor", "expert"):
        shards = run_ranks(4, lambda c: (lambda m: (m.shard, m.blocks[1]))(load_model(path, c, "float64",
                                                                                      experts=layout)))
        held = [s.n_expert_local for s, _ in shards]
        assert held == ([n_expert] * 4 if layout == "tensor" else [-(-(n_expert - r) // 4) for r in range(4)])
        for s, w in shards:
            for i in range(s.n_expert_local):
                e, cols = s.expert_start + i, s.expert_ffn_cols
                assert np.array_equal(w.W_CE[i], np.concatenate([gate_up[e, :f][cols].T, gate_up[e, f:][cols].T],
                                                                 axis=1))
                assert np.array_equal(w.W_DE[i], down[e][:, cols].T)


class Counting:
    """A communicator that counts its collectives by name."""

    def __init__(self, comm):
        self._comm, self.calls = comm, {}

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name not in ("Allreduce", "Alltoall", "Alltoallv", "Allgatherv", "Bcast"):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)
        return counted


@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
@pytest.mark.parametrize("layout", ["tensor", "expert"])
def test_each_layout_makes_its_collectives_per_block(tmp_path, name, layout):
    # tensor: the seed's two Allreduce; expert: the attention's Allreduce, the counts, the dispatch and the
    # combine, the gather. OLMoE's QK-norm adds one small Allreduce. The embedding's Allreduce is once per forward.
    hf_moe(name, tmp_path)
    n = COMMON["num_hidden_layers"]
    qk = n if name == "olmoe" else 0
    expected = ({"Allreduce": 1 + 2 * n + qk} if layout == "tensor" else
                {"Allreduce": 1 + n + qk, "Alltoall": n, "Alltoallv": 2 * n, "Allgatherv": n})

    def run(c):
        counting = Counting(c)
        m = load_model(str(tmp_path), counting, "float64", experts=layout)
        m.forward(PROMPT, m.new_cache(len(PROMPT)), gather=False)
        return counting.calls
    assert run_ranks(3, run) == [expected] * 3


def test_router_breaks_ties_by_the_lowest_expert_and_renormalizes_when_asked():
    C = np.eye(2)  # row 0 sees the router's weights of input 0, row 1 of input 1
    W = np.array([[1.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # row 0: experts 1 and 2 tie; row 1: all four
    R = route(C, W, 2, renormalize=False)
    p = np.exp([1.0, 2.0, 2.0, 0.0]) / np.exp([1.0, 2.0, 2.0, 0.0]).sum()
    assert np.allclose(R[0], [0, p[1], p[2], 0]) and np.allclose(R[1], [0.25, 0.25, 0, 0])
    R = route(C, W[:, :3], 1, renormalize=True)
    assert np.array_equal(R, [[0, 1, 0], [1, 0, 0]])


def test_default_layout_and_bad_layouts():
    config = load_config_like(n_expert=6, n_ffn_expert=20)
    # ceil(E/P)/E against ceil(F/P)/F: 6 experts over 2 and 3 ranks divide as well as 20 columns; over 4 not
    assert [default_layout(config, p) for p in (1, 2, 3, 4)] == ["expert", "expert", "expert", "tensor"]
    with pytest.raises(ShardingError, match="--experts 'rows' is not a layout"):
        shard_for(config, 0, 2, "rows")
    with pytest.raises(ShardingError, match="hidden columns over 4 ranks"):
        shard_for(load_config_like(n_expert=6, n_ffn_expert=3, model_type="qwen2_moe"), 0, 4, "tensor")


def test_bytes_per_token_arithmetic():
    config = load_config_like(n_expert=8, n_ffn_expert=20, n_embd=100, n_expert_used=2)
    assert bytes_per_token(config, 1, "tensor", 8) == bytes_per_token(config, 1, "expert", 8) == 0
    assert bytes_per_token(config, 2, "tensor", 8) == 800  # 2 (P - 1) / P n_embd itemsize
    assert bytes_per_token(config, 2, "expert", 8) == (2 * 202 / 4 + 50) * 8  # k (2 d + 2) (P-1)/P^2 + (P-1)/P d
    # where expert parallelism sends less: k (2 d + 2) < P d
    assert bytes_per_token(config, 8, "expert", 8) < bytes_per_token(config, 8, "tensor", 8)


def load_config_like(**facts):
    from mpitp.config import config_from_dict
    # Mixtral's keys; Qwen2-MoE's: its experts as narrow as asked, its shared expert of 8 columns
    cfg = dict(model_type=facts.get("model_type", "mixtral"), hidden_size=facts.get("n_embd", 48), head_dim=8,
               num_attention_heads=4, vocab_size=97, intermediate_size=facts["n_ffn_expert"], num_hidden_layers=1,
               max_position_embeddings=64, num_local_experts=facts["n_expert"], moe_intermediate_size=facts[
                   "n_ffn_expert"], shared_expert_intermediate_size=8, num_experts_per_tok=facts.get("n_expert_used", 2))
    return config_from_dict(cfg)


def moe_trace(folder, path, size, layout):
    """mpitp's trace of greedy generation on ``size`` simulated ranks in ``layout``."""
    folder.mkdir(parents=True)

    def rank(comm):
        trace = Trace(path)
        generate_batch(load_model(path, comm, "float64", experts=layout), [PROMPT[:9], PROMPT[9:14]], 3,
                       trace=trace)
        trace.save(folder / f"rank{comm.Get_rank()}.npz")
    run_ranks(size, rank)
    return folder


def test_traces_record_the_routing_and_the_experts_output_and_compare_across_layouts(family, tmp_path):
    path, model = family
    tensor, expert = moe_trace(tmp_path / "t3", path, 3, "tensor"), moe_trace(tmp_path / "e2", path, 2, "expert")
    with np.load(expert / "rank1.npz") as f:
        R, M = f["step0/layer0/R"], f["step0/layer0/M"]
        C, n_expert = f["step0/layer0/C"], model.model.layers[0].mlp.gate.weight.shape[0]
    assert R.shape == (14, n_expert) and M.shape == C.shape == (14, 48)
    assert (np.count_nonzero(R, axis=1) == FAMILIES[family_name(path)][1]["num_experts_per_tok"]).all()
    with torch.no_grad():  # HF's own router on the same normed rows: the same experts
        hf_router = model.model.layers[0].mlp.gate(torch.tensor(C))[2].numpy()
    assert (np.sort(hf_router, axis=1) == np.sort(np.argsort(-R, axis=1, kind="stable")[:, :hf_router.shape[1]],
                                                  axis=1)).all()
    assert compare.main([str(tensor), str(expert), "--rtol", "1e-11", "--atol", "1e-11"]) == 0
    with np.load(expert / "rank0.npz") as f:  # a routing weight changed on one rank: compare finds it
        arrays = dict(f)
    arrays["step1/layer2/R"][1, arrays["step1/layer2/R"][1].argmax()] += 1e-3
    np.savez(expert / "rank0.npz", **arrays)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert compare.main([str(tensor), str(expert)]) == 1
    assert "layer 2" in out.getvalue() and " R" in out.getvalue(), out.getvalue()


def family_name(path):
    return next(name for name in FAMILIES if f"/{name}" in path)


def test_a_float32_mixture_stays_float32(family):
    # Every layer's output keeps the model's dtype (an integer array in OLMoE's QK-norm once made it float64).
    path, _ = family
    for layout in ("tensor", "expert"):
        def run(c):
            m = load_model(path, c, "float32", experts=layout)
            with Trace() as trace:  # a profile hook: of this thread (this simulated rank)
                logits = m.forward(PROMPT, m.new_cache(len(PROMPT)))
            return logits.dtype, {a.dtype for k, a in trace.arrays.items() if "/layer" in k}
        for dtype, traced in run_ranks(2, run):
            assert dtype == np.float32 and traced == {np.dtype(np.float32)}, (layout, traced)
