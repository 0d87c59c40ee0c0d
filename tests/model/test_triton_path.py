"""FineCLIP end to end on the Triton kernels (interpreter on CPU, compiled on CUDA) equals the reference path.

Runs patch embedding, varlen attention with fused 2D / 1D RoPE, and the SigLIP loss through
`FINEVIT_KERNELS=triton`, forward and backward, on a tiny float32 model.
"""

import os

import pytest
import torch

import finevit.kernels as K
from finevit.model import FineCLIP, FineCLIPConfig, FineViTConfig, TextConfig

from .helpers import make_image_batch, make_text_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or TRITON_INTERPRET=1"
)


def step(model, images, texts):
    for p in model.parameters():
        p.grad = None
    img, txt = model(images, texts)
    loss = K.siglip_loss(img, txt, model.logit_scale.exp(), model.logit_bias)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_fineclip_step_on_triton_kernels_matches_the_reference(monkeypatch):
    torch.manual_seed(0)
    config = FineCLIPConfig.from_name(
        "tiny", vision=FineViTConfig.from_name("tiny", depth=1), text=TextConfig.from_name("tiny", depth=1)
    )
    model = FineCLIP(config)
    model.init_weights()
    model.to(DEVICE)
    images = make_image_batch([(3, 5), (2, 2), (4, 3)], config.vision.patch_features)
    images = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in images.items()}
    texts = make_text_batch([7, 3, 12], config.text.vocab_size)
    texts = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in texts.items()}

    monkeypatch.setenv("FINEVIT_KERNELS", "reference")
    ref_loss, ref_grads = step(model, images, texts)
    monkeypatch.setenv("FINEVIT_KERNELS", "triton")
    loss, grads = step(model, images, texts)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
