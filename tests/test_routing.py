import pytest
import torch
from torch import nn

import dist_muon as dm


class Attention(nn.Module):
    def __init__(self, d, n_heads, n_kv):
        super().__init__()
        head = d // n_heads
        self.wqkv = nn.Linear(d, (n_heads + 2 * n_kv) * head, bias=False)
        self.wo = nn.Linear(d, d, bias=True)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attention_norm = nn.RMSNorm(d)
        self.attention = Attention(d, 4, 2)
        self.ffn_norm = nn.LayerNorm(d)
        self.w13 = nn.Linear(d, 2 * 3 * d, bias=False)
        self.w2 = nn.Linear(3 * d, d, bias=False)
        self.gate = nn.Parameter(torch.zeros(d, d))
        self.gate.skip_orthogonalization = True


class Transformer(nn.Module):
    def __init__(self, vocab=50, d=16, tied=False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(2)])
        self.norm = nn.RMSNorm(d)
        self.output = nn.Linear(d, vocab, bias=False)
        if tied:
            self.output.weight = self.tok_embeddings.weight


class MoE(nn.Module):
    def __init__(self, d=16, experts=4, hidden=8):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, hidden, d))
        self.w2 = nn.Parameter(torch.randn(experts, d, hidden))
        self.w13_fused = nn.Parameter(torch.randn(experts * 2 * hidden, d))
        self.shared = nn.Linear(d, hidden, bias=False)


def _table(groups):
    return {name: (g["algorithm"], {k: g[k] for k in ("split_sizes", "num_experts", "num_heads") if k in g})
            for g in groups for name in g["param_names"]}


@pytest.mark.parametrize("tied", [False, True])
def test_transformer_routing_table(tied):
    model = Transformer(tied=tied)
    rules = [(r"attention\.wqkv\.weight$", {"split_sizes": (16, 8, 8)}), (r"\.w13\.weight$", {"split_sizes": (48, 48)})]
    groups = dm.build_param_groups(model, rules=rules)
    table = _table(groups)
    expected_adamw = {"tok_embeddings.weight", "norm.weight"} | {
        f"layers.{i}.{n}" for i in range(2)
        for n in ("attention_norm.weight", "ffn_norm.weight", "ffn_norm.bias", "attention.wo.bias", "gate")
    }
    if not tied:
        expected_adamw.add("output.weight")
    assert {n for n, (a, _) in table.items() if a == "adamw"} == expected_adamw
    assert {n for n, (a, _) in table.items() if a == "muon"} == {
        f"layers.{i}.{n}" for i in range(2) for n in ("attention.wqkv.weight", "attention.wo.weight", "w13.weight", "w2.weight")
    }
    assert table["layers.0.attention.wqkv.weight"][1] == {"split_sizes": (16, 8, 8)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # tied weight appears once
    opt = dm.DistMuon(groups, lr=0.02)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    report = dm.routing_report(opt)
    assert "layers.0.attention.wqkv.weight" in report and "1×16×16 + 2×8×16" in report


def test_moe_routing_and_views():
    model = MoE()
    groups = dm.build_param_groups(model, rules=[(r"w13_fused", {"num_experts": 4, "split_sizes": (8, 8)}),
                                                 (r"router", {"algorithm": "adamw"})])
    table = _table(groups)
    assert table["router.weight"][0] == "adamw"
    assert table["w1"][0] == table["w2"][0] == table["shared.weight"][0] == "muon"
    rows = {r["fqn"]: r for r in dm.routing.routing_rows(groups)}
    assert rows["w1"]["matrices"] == "4×8×16" and rows["w13_fused"]["matrices"] == "8×8×16"
    assert rows["w2"]["lr_scale"] == "1.4142"  # each 16×8 expert: sqrt(16/8), not the fused shape's
    opt = dm.DistMuon(groups, lr=0.02)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


def test_canonical_names_strip_wrappers():
    assert dm.canonical_fqn("layers.0._checkpoint_wrapped_module._orig_mod.w1.weight") == "layers.0.w1.weight"
    assert dm.canonical_fqn("_fsdp_wrapped_module.output.weight") == "output.weight"


def test_overrides_and_rule_hyperparameters():
    model = Transformer()
    groups = dm.build_param_groups(model, rules=[(r"w2", {"lr": 0.5})], weight_decay=0.1)
    w2 = next(g for g in groups if "layers.0.w2.weight" in g["param_names"])
    assert w2["lr"] == 0.5 and w2["weight_decay"] == 0.1
    assert all(g["weight_decay"] == 0.1 for g in groups)


@pytest.mark.parametrize("rules, match", [
    ([("(", {})], "invalid regex"),
    ([("w", {"algorithm": "sgd"})], "unknown algorithm"),
    ([("w", {"nope": 1})], "unknown option"),
    (["w"], "must be a"),
])
def test_bad_rules(rules, match):
    with pytest.raises(ValueError, match=match):
        dm.build_param_groups(Transformer(), rules=rules)


def test_rule_split_that_does_not_fit_names_the_parameter():
    groups = dm.build_param_groups(Transformer(), rules=[(r"wqkv", {"split_sizes": (16, 8)})])
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wqkv\.weight: split_sizes"):
        dm.DistMuon(groups, lr=0.02)


def test_hidden_linear_with_vocabulary_width_is_not_the_head():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 16)
            self.fc1 = nn.Linear(16, 32)  # hidden width happens to equal the vocabulary size
            self.proj = nn.Linear(32, 32)  # the real head: the last projection onto the vocabulary

    table = _table(dm.build_param_groups(Toy()))
    assert table["fc1.weight"][0] == "muon" and table["proj.weight"][0] == "adamw"


# --------------------------------------------------------------------------- convs, dtypes, reasons


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(4, 6, kernel_size=3)
        self.grouped1d = nn.Conv1d(4, 6, kernel_size=3, groups=2)
        self.depthwise = nn.Conv1d(6, 6, kernel_size=5, groups=6)
        self.conv2d = nn.Conv2d(3, 8, kernel_size=(3, 2))
        self.depthwise2d = nn.Conv2d(8, 8, kernel_size=3, groups=8)
        self.proj = nn.Linear(8, 8, bias=False)


class MyConv1d(nn.Conv1d):
    """A subclass is still a conv."""


def _rows(groups):
    return {r["fqn"]: r for r in dm.routing.routing_rows(groups)}


def test_conv_weights_are_one_flattened_matrix_and_depthwise_convs_go_to_adamw():
    groups = dm.build_param_groups(ConvNet())
    rows = _rows(groups)
    assert rows["conv1d.weight"]["matrices"] == "1×6×12"  # [out, in·k], not 6 matrices of 4×3
    assert rows["grouped1d.weight"]["matrices"] == "1×6×6"  # [out, in/groups · k]
    assert rows["conv2d.weight"]["matrices"] == "1×8×18"  # 3 · 3·2
    for name in ("conv1d.weight", "grouped1d.weight", "conv2d.weight"):
        assert (rows[name]["algorithm"], rows[name]["reason"]) == ("muon", "conv (flattened)"), name
    for name in ("depthwise.weight", "depthwise2d.weight"):
        assert (rows[name]["algorithm"], rows[name]["reason"]) == ("adamw", "depthwise conv"), name
    assert (rows["conv1d.bias"]["algorithm"], rows["conv1d.bias"]["reason"]) == ("adamw", "ndim < 2")
    assert rows["proj.weight"]["reason"] == "matrix"
    assert next(g for g in groups if "conv1d.weight" in g["param_names"])["flatten"] is True


def test_a_flattened_conv1d_steps_like_its_matrix():
    model = nn.Sequential(MyConv1d(4, 6, kernel_size=3, bias=False))
    flat = nn.Parameter(model[0].weight.detach().reshape(6, 12).clone())
    kwargs = dict(lr=0.05, weight_decay=0.1, ns_dtype=torch.float32)
    opt = dm.DistMuon(dm.build_param_groups(model), **kwargs)
    ref = dm.DistMuon([{"params": [flat], "algorithm": "muon"}], **kwargs)
    g = torch.randn(6, 4, 3)
    model[0].weight.grad, flat.grad = g.clone(), g.reshape(6, 12).clone()
    opt.step()
    ref.step()
    assert torch.allclose(model[0].weight.detach().reshape(6, 12), flat.detach(), rtol=0, atol=1e-6)


def test_a_rule_can_send_a_depthwise_conv_to_muon():
    groups = dm.build_param_groups(ConvNet(), rules=[(r"^depthwise\.weight$", {"algorithm": "muon"})])
    rows = _rows(groups)
    assert (rows["depthwise.weight"]["algorithm"], rows["depthwise.weight"]["reason"]) == ("muon", "rules[0]")
    assert rows["depthwise.weight"]["matrices"] == "1×6×5"
    assert rows["depthwise2d.weight"]["reason"] == "depthwise conv"
    opt = dm.DistMuon(groups, lr=0.02)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()


def test_the_report_says_why_each_parameter_went_where_it_did():
    model = Transformer()
    rules = [(r"attention\.wqkv\.weight$", {"split_sizes": (8, 4, 4), "interleave": 2}),
             (r"layers\.1\.w2\.weight$", {"algorithm": "adamw"})]
    groups = dm.build_param_groups(model, rules=rules)
    rows = _rows(groups)
    assert rows["tok_embeddings.weight"]["reason"] == "embedding"
    assert rows["output.weight"]["reason"] == "output head"
    assert rows["norm.weight"]["reason"] == "ndim < 2"
    assert rows["layers.0.gate"]["reason"] == "skip_orthogonalization"
    assert rows["layers.1.w2.weight"]["reason"] == "rules[1]"
    assert rows["layers.0.w2.weight"]["reason"] == "matrix"
    wqkv = rows["layers.0.attention.wqkv.weight"]
    assert (wqkv["reason"], wqkv["matrices"]) == ("matrix", "1×16×16 + 2×8×16")  # Q from both KV groups
    report = dm.routing_report(dm.DistMuon(groups, lr=0.02))  # the reasons survive the optimizer
    header = report.splitlines()[0].split()
    assert header[:4] == ["parameter", "shape", "algorithm", "reason"]
    line = next(ln for ln in report.splitlines() if ln.startswith("layers.1.w2.weight"))
    assert "rules[1]" in line and "adamw" in line
    hand_made = [{"params": [nn.Parameter(torch.zeros(4, 4))], "param_names": ["w"], "algorithm": "muon"}]
    assert _rows(hand_made)["w"]["reason"] == "param group"


def test_integer_and_bool_parameters_are_refused_by_name():
    for dtype in (torch.int64, torch.bool):
        p = torch.zeros(4, 4, dtype=dtype)
        with pytest.raises(ValueError, match=rf"layers\.0\.x: dtype {dtype} is not a floating-point type; "
                                             "DistMuon optimizes floating-point parameters only"):
            dm.DistMuon([{"params": [p], "param_names": ["layers.0.x"], "algorithm": "adamw"}], lr=0.02)


def test_build_param_groups_refuses_an_integer_parameter_that_claims_a_gradient():
    class Counter(nn.Module):
        """torch cannot set requires_grad on an integer tensor; a tensor subclass can claim it."""

        def named_parameters(self, *args, **kwargs):
            yield "layers.0.x", _ClaimsGrad(torch.zeros(3, dtype=torch.int64))

    with pytest.raises(ValueError, match=r"layers\.0\.x: dtype torch\.int64 is not a floating-point type"):
        dm.build_param_groups(Counter())
    frozen = nn.Module()
    frozen.x = nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    assert dm.build_param_groups(frozen) == []  # frozen parameters are not routed at all


class _ClaimsGrad(torch.Tensor):
    @property
    def requires_grad(self):
        return True
