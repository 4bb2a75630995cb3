"""Networks: logits shapes, configuration errors, weight-decay exclusions, double backward."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from flatsophia.models.components import GPT, MLP, ViT1D, timm_model
from flatsophia.optim import param_groups


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit1d_shapes_and_no_weight_decay(pool):
    model = ViT1D(input_shape=[40], num_classes=10, patch_size=4, embed_dim=32, depth=2, num_heads=4, pool=pool)
    assert model(torch.randn(5, 40)).shape == (5, 10)
    assert model(torch.randn(5, 1, 40)).shape == (5, 10)
    names = dict(model.named_parameters())
    assert "pos_embed" in names and names["pos_embed"].shape == (1, 10 + (pool == "cls"), 32)
    assert model.no_weight_decay() <= set(names)
    decayed = {id(p) for p in param_groups(model, decay="matrices")[0]["params"]}
    assert id(model.pos_embed) not in decayed
    assert id(model.patch_embed.weight) in decayed


def test_vit1d_multichannel_and_errors():
    model = ViT1D(input_shape=[3, 24], num_classes=4, patch_size=6, embed_dim=16, depth=1, num_heads=2)
    assert model(torch.randn(2, 3, 24)).shape == (2, 4)
    with pytest.raises(ValueError, match="patch_size"):
        ViT1D(input_shape=[40], patch_size=3)
    with pytest.raises(ValueError, match="num_heads"):
        ViT1D(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="pool"):
        ViT1D(pool="max")
    with pytest.raises(ValueError, match="expected inputs"):
        model(torch.randn(2, 24))


def test_vit1d_hessian_vector_product():
    """Sophia-H/FlatSophia need double backward through attention (math kernel)."""
    torch.manual_seed(0)
    model = ViT1D(embed_dim=16, depth=1, num_heads=2)
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    params = [p for p in model.parameters()]
    with sdpa_kernel(SDPBackend.MATH):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        v = [torch.randn_like(p) for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=v)
    assert all(torch.isfinite(h).all() for h in hv)


def test_mlp():
    model = MLP(input_shape=[1, 8, 8], num_classes=10, hidden_sizes=[32, 16], activation="tanh", norm=True, dropout=0.1)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert MLP(input_shape=40, num_classes=3, hidden_sizes=[])(torch.randn(2, 40)).shape == (2, 3)
    with pytest.raises(ValueError, match="activation"):
        MLP(input_shape=[4], num_classes=2, activation="swish2")
    with pytest.raises(ValueError, match="kind"):
        MLP(input_shape=[4], num_classes=2, kind="video")


def test_mlp_on_tokens_predicts_each_next_token_from_its_context_only():
    torch.manual_seed(0)
    model = MLP(input_shape=[12], num_classes=256, hidden_sizes=[32], kind="tokens", context=3, embed_dim=8).eval()
    idx = torch.randint(0, 256, (2, 12))
    logits = model(idx)
    assert logits.shape == (2, 12, 256)
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 256
    diff = (model(changed) - logits).abs().amax(dim=(0, 2))
    assert torch.all(diff[:6] == 0), "a position sees no later token"
    assert torch.all(diff[6:9] > 0) and torch.all(diff[9:] == 0), "and only its context of 3 tokens"


def test_models_declare_the_data_they_take():
    assert MLP.accepts == ("signal", "image", "tokens")
    assert ViT1D.accepts == ("signal",) and GPT.accepts == ("tokens",) and timm_model.accepts == ("image",)


def test_gpt_shapes_causality_and_tying():
    torch.manual_seed(0)
    model = GPT(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32).eval()
    idx = torch.randint(0, 256, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 256)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    assert torch.allclose(model(changed)[:, :10], logits[:, :10], atol=1e-5)  # no peeking ahead
    assert model.lm_head.weight is model.wte.weight
    assert model(idx[:, :5]).shape == (2, 5, 256)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, 256, (1, 17)))
    with pytest.raises(ValueError, match="n_head"):
        GPT(n_embd=30, n_head=4)
    decayed = {id(p) for p in param_groups(model, decay="matrices")[0]["params"]}
    assert id(model.wpe.weight) not in decayed and id(model.wte.weight) in decayed


def test_timm_vit_reference_geometry():
    """The FlatSophia reference ViT: 4 layers, width 512, 8 heads, no dropout, on 32x32 images."""
    model = timm_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=4,
        in_chans=3,
        num_classes=10,
        embed_dim=512,
        depth=4,
        num_heads=8,
        drop_rate=0.0,
    )
    assert len(model.blocks) == 4 and model.embed_dim == 512
    assert model.blocks[0].attn.num_heads == 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert 12e6 < n_params(model) < 14e6


def test_timm_resnet_small_stem():
    model = timm_model("resnet18", in_chans=1, num_classes=10, small_stem=True)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="small_stem"):
        timm_model("vit_tiny_patch16_224", small_stem=True, img_size=32, patch_size=4)
    with pytest.raises(ValueError, match="Unknown timm model"):
        timm_model("no_such_net")


def test_gpt_inverse_layer_attention_scale_equals_queries_divided_by_depth():
    """Sophia's GPT-2 runs divide block i's attention logits by i + 1: the same as a plain GPT whose
    query projections of block i are divided by i + 1 (an oracle that never scales the logits)."""
    torch.manual_seed(0)
    scaled = GPT(vocab_size=50, block_size=8, n_layer=3, n_head=2, n_embd=8, scale_attn_by_inverse_layer_idx=True)
    with torch.no_grad():  # larger q, k than at init: attention far from uniform, so the scale matters
        for block in scaled.blocks:
            block.attn.qkv.weight.mul_(30)
    plain = GPT(vocab_size=50, block_size=8, n_layer=3, n_head=2, n_embd=8)
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        for i, block in enumerate(plain.blocks):
            block.attn.qkv.weight[:8] /= i + 1  # rows of q (the first n_embd outputs)
            block.attn.qkv.bias[:8] /= i + 1
    x = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(scaled(x), plain(x))
    unscaled = GPT(vocab_size=50, block_size=8, n_layer=3, n_head=2, n_embd=8)
    unscaled.load_state_dict(scaled.state_dict())
    assert not torch.allclose(scaled(x), unscaled(x), atol=1e-4)  # the flag matters (blocks 1 and 2)


def test_gpt_token_embedding_decay_follows_its_flag():
    for flag, decayed in ((True, True), (False, False)):
        net = GPT(vocab_size=20, block_size=4, n_layer=1, n_head=2, n_embd=8, decay_token_embedding=flag)
        groups = param_groups(net, decay="matrices")
        assert any(p is net.wte.weight for p in groups[0]["params"]) is decayed
        assert any(p is net.blocks[0].attn.qkv.weight for p in groups[0]["params"])  # other matrices still decay
