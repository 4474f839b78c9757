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
