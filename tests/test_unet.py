"""The DDPM UNet: shapes, the paper's parameter count, conditioning, layouts and gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pixeldiffusion.config import ModelConfig
from pixeldiffusion.unet import UNet, build_unet, count_parameters, timestep_embedding


def tiny_unet(in_channels: int = 3, image_size: int = 32, **kwargs) -> UNet:
    """A few-thousand-parameter UNet with attention at half resolution, in eval mode."""
    options = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(image_size // 2,), norm_groups=8, num_heads=2, dropout=0.0)
    options.update(kwargs)
    torch.manual_seed(0)
    return UNet(in_channels=in_channels, image_size=image_size, **options).eval()


def perturb_zero_init(model: UNet, std: float = 0.05) -> UNet:
    """Give the zero-initialised layers small random values so every path carries signal."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size, channel_mult", [(28, (1, 2)), (32, (1, 2, 2)), (64, (1, 2, 2))])
def test_output_shape_matches_input(in_channels: int, size: int, channel_mult: tuple) -> None:
    model = perturb_zero_init(tiny_unet(in_channels, size, channel_mult=channel_mult))
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_other_sizes_and_out_channels() -> None:
    model = tiny_unet(3, 32, out_channels=6)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 24), 5)
    assert out.shape == (1, 6, 16, 24)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 3, 15, 16), 5)


def test_cifar10_parameter_count_matches_ddpm() -> None:
    # Ho et al. 2020: 35.7M; the exact count of pesser/pytorch_diffusion's cifar10 model.
    with torch.device("meta"):
        model = UNet(in_channels=3, image_size=32, channels=128, channel_mult=(1, 2, 2, 2),
                     num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
    assert count_parameters(model) == 35_746_307


def test_fresh_model_outputs_zero() -> None:
    model = tiny_unet(3, 32)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), torch.tensor([3, 700]))
    assert torch.equal(out, torch.zeros_like(out))


def test_timestep_embedding_is_ddpm_sinusoid() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 2.5]), 8)
    freqs = 10000.0 ** (-torch.arange(4) / 3)  # get_timestep_embedding: log(10000) / (half - 1)
    args = torch.tensor([0.0, 1.0, 2.5])[:, None] * freqs
    torch.testing.assert_close(emb, torch.cat([args.sin(), args.cos()], dim=1))
    assert timestep_embedding(torch.tensor([1]), 7).shape == (1, 7)


def test_int_float_and_scalar_timesteps() -> None:
    model = perturb_zero_init(tiny_unet(1, 28))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        out_int = model(x, torch.tensor([10, 10, 10]))
        torch.testing.assert_close(model(x, torch.tensor([10.0, 10.0, 10.0])), out_int)
        torch.testing.assert_close(model(x, 10), out_int)
        torch.testing.assert_close(model(x, torch.tensor(10)), out_int)
        torch.testing.assert_close(model(x, 10.0), out_int)
        out_frac = model(x, 10.5)
        out_next = model(x, 11)
    assert torch.isfinite(out_frac).all()
    assert not torch.allclose(out_frac, out_int) and not torch.allclose(out_frac, out_next)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2]))


def test_class_conditioning() -> None:
    model = perturb_zero_init(tiny_unet(1, 28, num_classes=10))
    assert model.null_class == model.num_classes == 10
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([50, 50])
    with torch.no_grad():
        out_3 = model(x, t, torch.tensor([3, 3]))
        out_7 = model(x, t, torch.tensor([7, 7]))
        out_null = model(x, t, torch.tensor([10, 10]))
        torch.testing.assert_close(model(x, t), out_null)
    assert not torch.allclose(out_3, out_7) and not torch.allclose(out_3, out_null)
    for bad in (torch.tensor([0, 11]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match=r"\[0, 10\]"):
            model(x, t, bad)
    with pytest.raises(ValueError, match="int64 or int32"):
        model(x, t, torch.tensor([1.0, 2.0]))


def test_labels_on_unconditional_model_raise() -> None:
    model = tiny_unet(1, 28)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 1, 28, 28), 1, torch.tensor([0]))


def test_channels_last_matches_contiguous() -> None:
    model = perturb_zero_init(tiny_unet(3, 32, channel_mult=(1, 2, 2)))
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([1, 500])
    with torch.no_grad():
        out = model(x, t)
        out_cl = model(x.to(memory_format=torch.channels_last), t)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_on_cpu() -> None:
    model = perturb_zero_init(tiny_unet(3, 32, num_classes=4))
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([1.0, 500.5])
    with torch.no_grad():
        reference = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.to(memory_format=torch.channels_last), t)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, atol=0.1, rtol=0.1)


def test_backward_reaches_every_parameter() -> None:
    model = perturb_zero_init(tiny_unet(3, 32, num_classes=3, dropout=0.1).train())
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 900]), torch.tensor([0, 3])
    model(x, t, y).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_zero_init_layers_learn() -> None:
    model = tiny_unet(1, 28).train()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 900])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        (model(x, t) - x).square().mean().backward()
        optimizer.step()
    assert model.conv_out.weight.any() and model.up[0][0].conv2.weight.any()


def test_build_unet_from_config() -> None:
    cfg = ModelConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                      dropout=0.0, num_heads=2, norm_groups=8, num_classes=5)
    model = build_unet(cfg, in_channels=1, image_size=16)
    assert model.num_classes == 5 and model.null_class == 5
    assert model.out_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2])).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("change, key", [
    ({"norm_groups": 12}, "model.norm_groups"),
    ({"num_heads": 3}, "model.num_heads"),
    ({"attn_resolutions": (5,)}, "model.attn_resolutions"),
    ({"channel_mult": (1, 2, 2, 2, 2, 2)}, "data.image_size"),
])
def test_impossible_architecture_names_config_key(change: dict, key: str) -> None:
    cfg = dataclasses.replace(ModelConfig(channels=16, norm_groups=8), **change)
    with pytest.raises(ValueError, match=key):
        build_unet(cfg, in_channels=3, image_size=16)
