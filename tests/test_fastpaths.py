"""The fast paths compute the same numbers as the plain ones (issue 7).

Training and sampling run the UNet in channels-last, AdamW as ``train.py`` builds it, the EMA as
one ``torch._foreach_lerp_`` and sampling under ``torch.inference_mode``; these tests compare each
against the plain formulation (contiguous tensors, the textbook update rules, autograd-tracked
sampling). bf16 autocast is compared with fp32 within bf16's precision. ``torch.compile`` costs
minutes of compilation on the 2-core test machine, so the compiled-vs-eager check runs only with
``PIXELDIFFUSION_TEST_COMPILE=1``.
"""

from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch

from pixeldiffusion.diffusion import training_loss
from pixeldiffusion.samplers import sample
from pixeldiffusion.schedule import alphas_cumprod_from_betas, linear_betas
from pixeldiffusion.train import ema_update
from pixeldiffusion.unet import UNet


def small_unet() -> UNet:
    """A ~20k-parameter UNet with attention; the zero-initialised layers get random values so
    every path (residual branches, attention output, final conv) carries signal and gradient."""
    torch.manual_seed(0)
    model = UNet(in_channels=3, image_size=16, channels=16, channel_mult=(1, 2),
                 num_res_blocks=1, attn_resolutions=(8,), norm_groups=8, num_heads=2,
                 dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def alphas_cumprod(timesteps: int = 100) -> torch.Tensor:
    """[T] float32 alphas_cumprod of DDPM's linear schedule (Ho et al. 2020, Sec. 4)."""
    return alphas_cumprod_from_betas(linear_betas(timesteps)).float()


def plain_adamw(params: list[torch.Tensor], grads: list[torch.Tensor], state: list[dict],
                step: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 0.01) -> None:
    """AdamW (Loshchilov & Hutter 2019, Alg. 2) written out, one tensor at a time."""
    beta1, beta2 = betas
    for param, grad, s in zip(params, grads, state, strict=True):
        param.mul_(1 - lr * weight_decay)
        s["m"] = beta1 * s["m"] + (1 - beta1) * grad
        s["v"] = beta2 * s["v"] + (1 - beta2) * grad * grad
        m_hat = s["m"] / (1 - beta1**step)
        v_hat = s["v"] / (1 - beta2**step)
        param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def test_training_steps_match_plain_formulation() -> None:
    """Two steps of train.py's fast path (channels-last model and batch, AdamW with a
    multi-tensor kernel, EMA by one ``_foreach_lerp_``) give the weights and EMA of the plain
    path: contiguous tensors, AdamW written out, ema <- decay * ema + (1 - decay) * theta."""
    fast, plain = small_unet(), small_unet()
    fast.to(memory_format=torch.channels_last)
    fast_ema, plain_ema = copy.deepcopy(fast).requires_grad_(False), copy.deepcopy(plain)
    optimizer = torch.optim.AdamW(fast.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
    params = list(plain.parameters())
    state = [{"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in params]
    schedule = alphas_cumprod()
    decay = 0.9
    for step in range(1, 3):
        x0 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(step))
        losses = []
        for model, batch in ((fast, x0.contiguous(memory_format=torch.channels_last)),
                             (plain, x0)):
            generator = torch.Generator().manual_seed(100 + step)  # same t and eps for both
            losses.append(training_loss(model, batch, schedule, generator=generator))
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        losses[0].backward()
        grads = torch.autograd.grad(losses[1], params)
        for param_fast, grad in zip(fast.parameters(), grads, strict=True):
            torch.testing.assert_close(param_fast.grad, grad, rtol=1e-3, atol=1e-4)
        # Both updates take the same gradients: Adam's m / sqrt(v) would blow up the last-bit
        # differences of the two layouts in near-zero gradients into lr-sized ones.
        same_grads = [p.grad.clone() for p in fast.parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(fast_ema, fast, decay)
        with torch.no_grad():
            plain_adamw(params, same_grads, state, step, lr=1e-3)
            for ema_param, param in zip(plain_ema.parameters(), params, strict=True):
                ema_param.copy_(decay * ema_param + (1 - decay) * param)
    for a, b in zip(fast.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(fast_ema.parameters(), plain_ema.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_kernels_agree(fused: bool) -> None:
    """The fused (single-kernel) and foreach AdamW that train.py may pick match the for-loop one
    on the UNet's parameters and a real training gradient."""
    reference, other = small_unet(), small_unet()
    x0 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loss = training_loss(reference, x0, alphas_cumprod(),
                         generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-3, foreach=False)
    opt = torch.optim.AdamW(other.parameters(), lr=1e-3, fused=fused or None,
                            foreach=None if fused else True)
    for model, optimizer in ((reference, opt_ref), (other, opt)):
        for scale in (1.0, -0.5):  # two steps, so the moments m and v matter
            for param, grad in zip(model.parameters(), grads, strict=True):
                param.grad = grad * scale
            optimizer.step()
    for a, b in zip(reference.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inference_mode_channels_last_sampling_matches_plain() -> None:
    """DDIM sampling (Song et al. 2021, eq. 12) through the fast path (channels-last x_T and
    model, ``torch.inference_mode``) ends at the x_0 of contiguous sampling with autograd on."""
    fast, plain = small_unet().eval(), small_unet().eval()
    fast.to(memory_format=torch.channels_last)
    x_T = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        x0_fast = sample(fast, x_T.contiguous(memory_format=torch.channels_last),
                         alphas_cumprod(), sampler="ddim", steps=4)
    x0_plain = sample(plain, x_T, alphas_cumprod(), sampler="ddim", steps=4)
    assert x0_fast.shape == x_T.shape
    torch.testing.assert_close(x0_fast, x0_plain.detach(), rtol=1e-4, atol=1e-5)


def test_bf16_training_step_within_tolerance() -> None:
    """A bf16-autocast training step (as ``--train.mixed_precision bf16``) gives the fp32 loss
    and gradients to bf16's precision (8 mantissa bits: ~0.4% per op)."""
    model = small_unet().to(memory_format=torch.channels_last)
    x0 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)).contiguous(
        memory_format=torch.channels_last)
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = training_loss(model, x0, alphas_cumprod(),
                                 generator=torch.Generator().manual_seed(7))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss, torch.cat([g.flatten() for g in grads])))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16.dtype == torch.float32 and torch.isfinite(grad16).all()
    torch.testing.assert_close(loss16, loss32, rtol=0.03, atol=1e-3)
    relative = (grad16 - grad32).norm() / grad32.norm()
    assert relative < 0.05, f"bf16 gradients differ from fp32 by {relative:.3f} (relative L2)"
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert cosine > 0.998


@pytest.mark.skipif(os.environ.get("PIXELDIFFUSION_TEST_COMPILE") != "1",
                    reason="torch.compile takes minutes on 2 CPU cores; set "
                           "PIXELDIFFUSION_TEST_COMPILE=1 to run")
def test_compiled_matches_eager() -> None:
    """torch.compile (the benchmark's --compile) gives the eager model's output and gradients."""
    model = small_unet().to(memory_format=torch.channels_last)
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([3, 70])
    out_eager, out_compiled = model(x, t), compiled(x, t)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    grads_eager = torch.autograd.grad(out_eager.square().mean(), list(model.parameters()))
    grads_compiled = torch.autograd.grad(out_compiled.square().mean(), list(model.parameters()))
    for a, b in zip(grads_compiled, grads_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_fast_kernels_turn_on_cudnn_autotuning_on_cuda_only(monkeypatch) -> None:
    """cuDNN's per-shape algorithm search is switched on for CUDA devices and left alone on
    others (the flag is global, so a CPU run must not flip it)."""
    from pixeldiffusion.device import use_fast_kernels

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    use_fast_kernels(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    use_fast_kernels(torch.device("cuda", 0))  # a device object needs no GPU to exist
    assert torch.backends.cudnn.benchmark is True


def sampling_config(**sample: object):
    """A Config that generates 3 images of small_unet's 3x16x16 with 4 DDIM steps over T=100."""
    from dataclasses import replace

    from pixeldiffusion.config import Config

    cfg = Config()
    return replace(cfg, data=replace(cfg.data, channels=3, image_size=16),
                   diffusion=replace(cfg.diffusion, timesteps=100),
                   sample=replace(cfg.sample, sampler="ddim", steps=4, n_samples=3, **sample))


class Spy(torch.nn.Module):
    """Records, for each call, the memory format of x_t, whether inference mode was on and the
    autocast state, then calls the wrapped model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls.append((x.is_contiguous(memory_format=torch.channels_last),
                           torch.is_inference_mode_enabled(),
                           torch.is_autocast_enabled("cpu")))
        return self.model(x, t, **kwargs)


def test_generate_samples_channels_last_under_inference_mode() -> None:
    """``generate`` (what sample, eval, the UI and training's grids call) runs the fast path the
    speed table measures: channels-last x_t and weights, inference mode, no autocast at fp32; and
    it draws the images the plain contiguous sampler draws from the same noise."""
    from pixeldiffusion.device import make_generator
    from pixeldiffusion.generate import generate
    from pixeldiffusion.schedule import alphas_cumprod_of

    cfg = sampling_config()
    spy = Spy(small_unet().eval())
    images = generate(spy, cfg, torch.device("cpu")).images
    assert spy.calls == [(True, True, False)] * 4
    assert spy.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x_T = torch.randn((3, 3, 16, 16), generator=make_generator(torch.device("cpu"), 0))
    with torch.no_grad():
        plain = sample(small_unet().eval(), x_T, alphas_cumprod_of(cfg), sampler="ddim", steps=4)
    torch.testing.assert_close(images, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_sampling_within_tolerance(precision: str) -> None:
    """``sample.precision: bf16`` (or fp16) autocasts every model call and ends within that
    dtype's precision of the fp32 images (the sampler's own arithmetic stays fp32: the output
    dtype is float32)."""
    from pixeldiffusion.generate import generate

    spy = Spy(small_unet().eval())
    images16 = generate(spy, sampling_config(precision=precision), torch.device("cpu")).images
    assert [autocast for *_, autocast in spy.calls] == [True] * 4
    images32 = generate(small_unet().eval(), sampling_config(), torch.device("cpu")).images
    assert images16.dtype == torch.float32
    error = (images16 - images32).abs().max()
    assert 0 < error < 0.05, f"{precision} sampling is {error:.4f} from fp32 (max abs, in [-1, 1])"


def test_cuda_graph_outputs_are_copied_before_samplers_keep_them(monkeypatch) -> None:
    """With ``compile`` on CUDA the model runs as a replayed CUDA graph whose output buffer the
    next replay overwrites; ``sampling_network`` must hand the sampler a copy. Checked with a
    stand-in for torch.compile that reuses one output buffer the way a graph does (no GPU
    needed: only the wrapper's logic is under test)."""
    generate_module = importlib.import_module("pixeldiffusion.generate")

    options = []

    class OneBuffer:
        def __init__(self, model, **kwargs):
            options.append(kwargs)
            self.buffer = None

        def __call__(self, x, t, **kwargs):
            self.buffer = torch.full_like(x, float(t[0])) if self.buffer is None \
                else self.buffer.fill_(float(t[0]))
            return self.buffer

    monkeypatch.setattr(generate_module.torch, "compile", OneBuffer)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)  # no GPU to move to
    net = generate_module.sampling_network(torch.nn.Identity(), torch.device("cuda"),
                                           compile=True)
    x = torch.zeros(1, 1, 2, 2)
    first, second = net(x, torch.tensor([5])), net(x, torch.tensor([7]))
    assert first.unique().tolist() == [5.0] and second.unique().tolist() == [7.0]
    assert options == [{"mode": "reduce-overhead", "dynamic": False}]


@pytest.mark.skipif(os.environ.get("PIXELDIFFUSION_TEST_COMPILE") != "1",
                    reason="torch.compile takes minutes on 2 CPU cores; set "
                           "PIXELDIFFUSION_TEST_COMPILE=1 to run")
def test_compiled_sampling_matches_eager() -> None:
    """``sample.compile: true`` draws the eager images (same noise, same sampler)."""
    from pixeldiffusion.generate import generate

    eager = generate(small_unet().eval(), sampling_config(), torch.device("cpu")).images
    compiled = generate(small_unet().eval(), sampling_config(compile=True),
                        torch.device("cpu")).images
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(os.environ.get("PIXELDIFFUSION_TEST_COMPILE") != "1",
                    reason="torch.compile takes minutes on 2 CPU cores; set "
                           "PIXELDIFFUSION_TEST_COMPILE=1 to run")
def test_compiled_training_matches_eager(tmp_path, tiny_args) -> None:
    """``--train.compile true`` trains the eager run's weights (same seed, same batches, no
    dropout, whose random masks the compiler draws differently) and writes checkpoints that load
    into the plain UNet (no torch.compile key prefixes). Adam divides each gradient by its own
    running size, so a near-zero gradient that rounds differently can move one weight by up
    to a learning-rate-sized step: nearly all weights must agree to 1e-5, every one to lr."""
    from safetensors.torch import load_file

    from pixeldiffusion.checkpoint import load_checkpoint
    from pixeldiffusion.cli import main

    weights = []
    for name, flag in (("eager", "false"), ("compiled", "true")):
        run = tmp_path / name
        assert main(["train", "-e", str(run), *tiny_args, "--model.dropout", "0",
                     "--train.compile", flag, "--no_progress"]) == 0
        load_checkpoint(run)  # strict load into build_unet's UNet
        checkpoint = next((run / "checkpoints").glob("step-*"))
        weights.append(load_file(checkpoint / "weights.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    eager, compiled = (torch.cat([w[k].flatten() for k in sorted(w)]) for w in weights)
    difference = (compiled - eager).abs()
    assert (difference <= 1e-5).float().mean() > 0.99, f"{(difference > 1e-5).sum()} weights differ"
    assert difference.max() <= 1e-3  # tiny_args' train.lr
