"""Every input check of the public ops raises the right error type with a message naming the argument."""

import pytest
import torch

import finevit.kernels as K


def qkv(total=10, heads=2, head_dim=32, dtype=torch.float32):
    return [torch.randn(total, heads, head_dim, dtype=dtype) for _ in range(3)]


def cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32)


def attention_case(**changes):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v, cu_seqlens=cu(0, 4, 10), max_seqlen=6, cos=None, sin=None, softmax_scale=None)
    args.update(changes)
    return args


def call_attention(args):
    return K.varlen_attention(args["q"], args["k"], args["v"], args["cu_seqlens"], args["max_seqlen"],
                              cos=args["cos"], sin=args["sin"], softmax_scale=args["softmax_scale"])


cos4, sin4 = torch.ones(10, 4), torch.zeros(10, 4)

ATTENTION_ERRORS = {
    "q_not_tensor": (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    "q_2d": (dict(q=torch.randn(10, 64)), ValueError, "q must have 3 dimensions"),
    "q_int": (dict(q=torch.ones(10, 2, 32, dtype=torch.int32)), TypeError, "q must have dtype"),
    "k_dtype": (dict(k=torch.randn(10, 2, 32, dtype=torch.float16)), TypeError, "k must have dtype in (float32)"),
    "v_shape": (dict(v=torch.randn(10, 3, 32)), ValueError, "v must have q's shape"),
    "k_meta_device": (dict(k=torch.randn(10, 2, 32, device="meta")), ValueError, "k must be on cpu"),
    "q_last_dim_strided": (dict(q=torch.randn(10, 2, 64)[..., ::2]), ValueError, "q must be contiguous in its last"),
    "head_dim_24": (dict(q=torch.randn(10, 2, 24), k=torch.randn(10, 2, 24), v=torch.randn(10, 2, 24)),
                    ValueError, "head_dim must be a multiple of 8 in [32, 256], got 24"),
    "head_dim_264": (dict(q=torch.randn(10, 1, 264), k=torch.randn(10, 1, 264), v=torch.randn(10, 1, 264)),
                     ValueError, "got 264"),
    "head_dim_36": (dict(q=torch.randn(10, 1, 36), k=torch.randn(10, 1, 36), v=torch.randn(10, 1, 36)),
                    ValueError, "got 36"),
    "no_tokens": (dict(q=torch.randn(0, 2, 32), k=torch.randn(0, 2, 32), v=torch.randn(0, 2, 32),
                       cu_seqlens=cu(0, 0)), ValueError, "at least one token"),
    "cu_int64": (dict(cu_seqlens=torch.tensor([0, 4, 10])), TypeError, "cu_seqlens must have dtype in (int32)"),
    "cu_2d": (dict(cu_seqlens=cu(0, 4, 10)[None]), ValueError, "cu_seqlens must have 1 dimensions"),
    "cu_one_entry": (dict(cu_seqlens=cu(0)), ValueError, "num_seqs + 1 >= 2"),
    "cu_not_from_zero": (dict(cu_seqlens=cu(1, 4, 10)), ValueError, "cu_seqlens must start at 0, got 1"),
    "cu_decreasing": (dict(cu_seqlens=cu(0, 6, 4, 10)), ValueError,
                      "non-decreasing, got cu_seqlens[1]=6 > cu_seqlens[2]=4"),
    "cu_wrong_end": (dict(cu_seqlens=cu(0, 4, 9)), ValueError, "must end at total_tokens=10, got 9"),
    "max_seqlen_small": (dict(max_seqlen=5), ValueError, "max_seqlen=5 is smaller than the longest sequence (6"),
    "max_seqlen_tensor": (dict(max_seqlen=torch.tensor(6)), TypeError, "max_seqlen must be a Python int"),
    "max_seqlen_bool": (dict(max_seqlen=True), TypeError, "max_seqlen must be a Python int"),
    "max_seqlen_zero": (dict(max_seqlen=0), ValueError, "max_seqlen must be >= 1"),
    "cos_without_sin": (dict(cos=cos4), ValueError, "cos and sin must be given together"),
    "cos_float16": (dict(cos=cos4.half(), sin=sin4.half()), TypeError, "cos must have dtype in (float32)"),
    "cos_rows": (dict(cos=torch.ones(9, 4), sin=torch.zeros(9, 4)), ValueError, "one row per token (10)"),
    "cos_sin_shapes": (dict(cos=cos4, sin=torch.zeros(10, 3)), ValueError, "cos and sin must have the same shape"),
    "cos_too_wide": (dict(cos=torch.ones(10, 17), sin=torch.zeros(10, 17)), ValueError, "rotary_dim <= head_dim=32"),
    "cos_3d": (dict(cos=torch.ones(10, 1, 4), sin=torch.zeros(10, 1, 4)), ValueError, "cos must have 2 dimensions"),
    "scale_negative": (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a finite positive"),
    "scale_nan": (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite positive"),
    "scale_tensor": (dict(softmax_scale=torch.tensor(0.1)), TypeError, "softmax_scale must be a float"),
}


@pytest.mark.parametrize("case", list(ATTENTION_ERRORS))
def test_varlen_attention_rejects_bad_input_with_a_message_naming_it(case):
    changes, error, message = ATTENTION_ERRORS[case]
    with pytest.raises(error, match="^varlen_attention: ") as info:
        call_attention(attention_case(**changes))
    assert message in str(info.value)


def test_value_checks_run_on_cpu_tensors_and_never_on_meta_tensors(monkeypatch):
    from finevit.kernels._validation import should_check_values

    assert should_check_values(torch.zeros(1))
    monkeypatch.setenv("FINEVIT_CHECK_VALUES", "1")
    assert not should_check_values(torch.zeros(1, device="meta"))  # meta tensors have no values


def test_varlen_attention_accepts_fused_qkv_views():
    qkv_packed = torch.randn(10, 3, 2, 32)  # (T, 3, H, D): q, k, v are strided views
    q, k, v = qkv_packed.unbind(1)
    out = K.varlen_attention(q, k, v, cu(0, 4, 10), 6)
    assert out.shape == (10, 2, 32)


ROPE_ERRORS = {
    "x_2d": ((torch.randn(10, 32), cos4, sin4), ValueError, "x must have 3 dimensions"),
    "x_int": ((torch.ones(10, 2, 32, dtype=torch.int64), cos4, sin4), TypeError, "x must have dtype"),
    "cos_rows": ((torch.randn(8, 2, 32), cos4, sin4), ValueError, "one row per token (8)"),
    "cos_wide": ((torch.randn(10, 2, 32), torch.ones(10, 20), torch.zeros(10, 20)), ValueError, "rotary_dim"),
    "sin_missing": ((torch.randn(10, 2, 32), cos4, None), TypeError, "sin must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(ROPE_ERRORS))
def test_apply_rope_rejects_bad_input(case):
    args, error, message = ROPE_ERRORS[case]
    with pytest.raises(error, match="^apply_rope: ") as info:
        K.apply_rope(*args)
    assert message in str(info.value)


pos2 = torch.zeros(5, 2, dtype=torch.int64)
pos3, pos1 = torch.zeros(5, 3, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
COS_SIN_ERRORS = {
    "float_positions": (K.rope_2d_cos_sin, (pos2.float(), 32), TypeError, "must have dtype in (int32, int64)"),
    "positions_3_cols": (K.rope_2d_cos_sin, (pos3, 32), ValueError, "(total_tokens, 2)"),
    "positions_1d": (K.rope_2d_cos_sin, (pos1, 32), ValueError, "positions must have 2 dim"),
    "rotary_not_multiple_of_4": (K.rope_2d_cos_sin, (pos2, 32, 10000.0, 30), ValueError, "multiple of 4"),
    "rotary_over_head_dim": (K.rope_2d_cos_sin, (pos2, 32, 10000.0, 64), ValueError, "<= head_dim=32"),
    "theta_zero": (K.rope_2d_cos_sin, (pos2, 32, 0.0), ValueError, "theta must be a finite positive"),
    "head_dim_float": (K.rope_2d_cos_sin, (pos2, 32.0), TypeError, "head_dim must be a Python int"),
    "text_positions_2d": (K.rope_1d_cos_sin, (pos2, 32), ValueError, "positions must have 1 dim"),
    "text_rotary_odd": (K.rope_1d_cos_sin, (torch.arange(5), 32, 10000.0, 7), ValueError, "multiple of 2"),
}


@pytest.mark.parametrize("case", list(COS_SIN_ERRORS))
def test_rope_cos_sin_builders_reject_bad_input(case):
    fn, args, error, message = COS_SIN_ERRORS[case]
    with pytest.raises(error, match=f"^{fn.__name__}: ") as info:
        fn(*args)
    assert message in str(info.value)


u8 = torch.zeros(4, 3 * 4 * 4, dtype=torch.uint8)
w = torch.randn(8, 48)
PATCH_ERRORS = {
    "weight_1d": (dict(weight=torch.randn(48)), ValueError, "weight must have 2 dimensions"),
    "patches_3d": (dict(patches=torch.zeros(4, 3, 16, dtype=torch.uint8)), ValueError, "patches must have 2 dim"),
    "patches_int32": (dict(patches=u8.int()), TypeError, "patches must have dtype in (uint8, float32)"),
    "patches_other_float": (dict(patches=u8.half(), mean=None, std=None), TypeError, "patches must have dtype"),
    "features_mismatch": (dict(patches=torch.zeros(4, 47, dtype=torch.uint8)), ValueError, "C·P·P=48"),
    "bias_shape": (dict(bias=torch.zeros(7)), ValueError, "bias must have shape (8,)"),
    "bias_dtype": (dict(bias=torch.zeros(8, dtype=torch.float64)), TypeError, "bias must have dtype in (float32)"),
    "mean_missing": (dict(mean=None), ValueError, "uint8 patches need mean and std"),
    "mean_tensor": (dict(mean=torch.zeros(3)), TypeError, "mean must be a sequence of floats"),
    "mean_nan": (dict(mean=[0.5, float("nan"), 0.5]), TypeError, "mean must hold finite floats"),
    "length_mismatch": (dict(mean=[0.5, 0.5]), ValueError, "one value per channel"),
    "std_zero": (dict(std=[0.5, 0.0, 0.5]), ValueError, "std must be positive"),
    "channels_not_dividing": (dict(patches=torch.zeros(4, 50, dtype=torch.uint8), weight=torch.randn(8, 50)),
                              ValueError, "not a multiple of C=3"),
    "float_with_mean": (dict(patches=u8.float()), ValueError, "pass neither"),
}


@pytest.mark.parametrize("case", list(PATCH_ERRORS))
def test_patch_embed_rejects_bad_input(case):
    args = dict(patches=u8, weight=w, bias=torch.zeros(8), mean=[0.5] * 3, std=[0.25] * 3)
    changes, error, message = PATCH_ERRORS[case]
    args.update(changes)
    with pytest.raises(error, match="^patch_embed: ") as info:
        K.patch_embed(args["patches"], args["weight"], args["bias"], mean=args["mean"], std=args["std"])
    assert message in str(info.value)


feats = torch.randn(6, 16)
LOSS_ERRORS = {
    "img_1d": (dict(img=torch.randn(16)), ValueError, "img must have 2 dimensions"),
    "txt_dtype": (dict(txt=torch.randn(6, 16, dtype=torch.float64)), TypeError, "txt must have dtype in (float32)"),
    "shape_mismatch": (dict(txt=torch.randn(5, 16)), ValueError, "txt must have img's shape (6, 16)"),
    "empty": (dict(img=torch.randn(0, 16), txt=torch.randn(0, 16)), ValueError, "at least one pair"),
    "scale_float": (dict(logit_scale=10.0), TypeError, "logit_scale must be a torch.Tensor"),
    "scale_vector": (dict(logit_scale=torch.ones(2)), ValueError, "logit_scale must hold one value"),
    "bias_int": (dict(logit_bias=torch.tensor(1)), TypeError, "logit_bias must have dtype"),
    "group_without_dist": (dict(group=object()), RuntimeError, "torch.distributed is not initialized"),
}


@pytest.mark.parametrize("case", list(LOSS_ERRORS))
def test_losses_reject_bad_input(case):
    args = dict(img=feats, txt=feats, logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-10.0), group=None)
    changes, error, message = LOSS_ERRORS[case]
    args.update(changes)
    with pytest.raises(error, match="^siglip_loss: ") as info:
        K.siglip_loss(args["img"], args["txt"], args["logit_scale"], args["logit_bias"], group=args["group"])
    assert message in str(info.value)
    if case != "bias_int":
        with pytest.raises(error, match="^clip_loss: "):
            K.clip_loss(args["img"], args["txt"], args["logit_scale"], group=args["group"])
