"""The public ops trace under torch.compile(fullgraph=True) without graph breaks (reference path, CPU).

The value checks of cu_seqlens read the tensor on the host, which Dynamo cannot trace: they must be
skipped while compiling. The Triton kernels' compile-ability is tested on a GPU (the interpreter's
fake tensors carry no data).
"""

import torch
import torch.nn.functional as F

import finevit.kernels as K


def compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_attention_and_rope_compile_without_graph_breaks_and_match_eager():
    lengths = [3, 5, 1]
    cu = K.cu_seqlens_from_lengths(lengths)
    q, k, v = (torch.randn(9, 2, 32, requires_grad=True) for _ in range(3))
    positions = torch.randint(0, 5, (9, 2))

    def attention(q, k, v, cu, positions):
        cos, sin = K.rope_2d_cos_sin(positions, 32)
        return K.apply_rope(K.varlen_attention(q, k, v, cu, 5, cos=cos, sin=sin), cos, sin)

    out = compiled(attention)(q, k, v, cu, positions)
    torch.testing.assert_close(out, attention(q, k, v, cu, positions), rtol=0, atol=1e-6)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_patch_embed_and_losses_compile_without_graph_breaks():
    patches = torch.randint(0, 256, (5, 48), dtype=torch.uint8)
    weight = torch.randn(8, 48, requires_grad=True)
    embed = compiled(lambda p, w: K.patch_embed(p, w, None, mean=[0.5] * 3, std=[0.25] * 3))
    torch.testing.assert_close(embed(patches, weight), K.patch_embed(patches, weight, mean=[0.5] * 3, std=[0.25] * 3))

    img, txt = F.normalize(torch.randn(6, 16), dim=-1), F.normalize(torch.randn(6, 16), dim=-1)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    losses = compiled(lambda a, b, s, c: K.siglip_loss(a, b, s, c) + K.clip_loss(a, b, s))
    expected = K.siglip_loss(img, txt, scale, bias) + K.clip_loss(img, txt, scale)
    torch.testing.assert_close(losses(img, txt, scale, bias), expected)
