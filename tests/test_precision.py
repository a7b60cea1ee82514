"""``precision auto`` (issue 21): bf16 only where the device runs it natively and the model is
wide enough to gain, fp32 elsewhere; the choice is printed once by sample, eval and serve.

The capability queries (``torch.cpu._is_avx512_bf16_supported`` and friends,
``torch.cuda.is_bf16_supported``) are faked with monkeypatch, so every machine kind is tested on
any machine; the autocast itself runs for real on this CPU, emulated or not.
"""

from __future__ import annotations

import pytest
import torch

from pixeldiffusion.device import (
    AUTO_BF16_MIN_WIDTH,
    conv_width,
    precision_rule,
    resolve_precision,
)
from pixeldiffusion.unet import UNet

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
WIDE, NARROW = AUTO_BF16_MIN_WIDTH * 2, AUTO_BF16_MIN_WIDTH // 2


def fake_cpu(monkeypatch, *, avx512_bf16: bool, amx: bool = False, cap: str | None = None) -> None:
    """Make this CPU look like one with (or without) AVX-512-BF16 / AMX, under an optional
    ``ONEDNN_MAX_CPU_ISA`` cap."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)


def fake_cuda(monkeypatch, *, bf16: bool) -> None:
    """Make ``torch.cuda.is_bf16_supported`` answer as an Ampere-or-later GPU (True) or an older
    one (False) would, emulation not counted."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: bf16 or including_emulation)


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected", "reason"), [
    (True, False, "bf16", "native AVX-512-BF16"),
    (True, True, "bf16", "native AMX"),
    (False, True, "bf16", "native AMX"),
    (False, False, "fp32", "no native bf16 on cpu"),  # AVX2-only: bf16 would be emulated
])
def test_auto_on_cpus(monkeypatch, avx512_bf16, amx, expected, reason) -> None:
    fake_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    choice = resolve_precision("auto", CPU, WIDE)
    assert (choice.precision, choice.reason) == (expected, reason)
    assert str(choice) == f"precision: auto -> {expected} ({reason})"


@pytest.mark.parametrize(("cap", "expected"), [
    ("AVX2", "fp32"), ("avx512_core", "fp32"), ("AVX512_CORE_VNNI", "fp32"),
    ("AVX512_CORE_BF16", "bf16"), ("AVX512_CORE_AMX", "bf16"), ("ALL", "bf16"), ("", "bf16"),
])
def test_a_onednn_isa_cap_below_bf16_means_fp32(monkeypatch, cap, expected) -> None:
    """``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16 makes oneDNN emulate bf16 on a native CPU,
    which torch's capability query does not see: auto reads the cap and stays in fp32."""
    fake_cpu(monkeypatch, avx512_bf16=True, cap=cap)
    assert resolve_precision("auto", CPU, WIDE).precision == expected


def test_cpu_without_onednn_is_not_native(monkeypatch) -> None:
    fake_cpu(monkeypatch, avx512_bf16=True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert resolve_precision("auto", CPU, WIDE).precision == "fp32"


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda(monkeypatch, bf16, expected) -> None:
    """bf16 on GPUs that run it natively (Ampere and later); fp32 on older ones, where torch
    would emulate it."""
    fake_cuda(monkeypatch, bf16=bf16)
    choice = resolve_precision("auto", CUDA, WIDE)
    assert choice.precision == expected
    assert choice.reason == ("native CUDA bf16" if bf16 else "no native bf16 on cuda")


def test_auto_on_mps_is_fp32() -> None:
    assert resolve_precision("auto", MPS, WIDE).precision == "fp32"


@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_narrow_models_stay_fp32_on_native_devices(monkeypatch, where) -> None:
    """A model whose widest convolution is under AUTO_BF16_MIN_WIDTH (the default digits model:
    64) measured no faster in bf16, so auto keeps it in fp32 even where bf16 is native."""
    fake_cpu(monkeypatch, avx512_bf16=True)
    fake_cuda(monkeypatch, bf16=True)
    device = torch.device(where)
    assert resolve_precision("auto", device, NARROW).precision == "fp32"
    assert resolve_precision("auto", device, AUTO_BF16_MIN_WIDTH).precision == "bf16"
    assert "gains nothing from bf16" in resolve_precision("auto", device, NARROW).reason


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept(monkeypatch, precision) -> None:
    fake_cpu(monkeypatch, avx512_bf16=False)
    choice = resolve_precision(precision, CPU, NARROW)
    assert (choice.precision, str(choice)) == (precision, f"precision: {precision} -> "
                                                          f"{precision} (as asked)")


def test_the_server_line_states_the_rule(monkeypatch) -> None:
    fake_cpu(monkeypatch, avx512_bf16=True)
    assert precision_rule(CPU) == (
        f"precision: auto -> bf16 (native AVX-512-BF16) for models whose widest convolution has "
        f">= {AUTO_BF16_MIN_WIDTH} channels, fp32 for narrower ones")
    fake_cpu(monkeypatch, avx512_bf16=True, cap="AVX2")
    assert precision_rule(CPU) == "precision: auto -> fp32 (no native bf16 on cpu)"


def test_conv_width_is_the_widest_convolution() -> None:
    """The UNet's widest convolution has channels * max(channel_mult) outputs."""
    model = UNet(in_channels=1, image_size=16, channels=16, channel_mult=(1, 2, 4),
                 num_res_blocks=1, attn_resolutions=(4,), norm_groups=8)
    assert conv_width(model) == 64
    assert conv_width(torch.nn.Identity()) == 0


def test_sampling_defaults_to_auto() -> None:
    from pixeldiffusion.config import Config

    assert Config().sample.precision == "auto"


def wide_unet() -> UNet:
    """A UNet whose widest convolution has AUTO_BF16_MIN_WIDTH channels, with the
    zero-initialised output layers given values so the images depend on every path."""
    torch.manual_seed(0)
    model = UNet(in_channels=3, image_size=8, channels=AUTO_BF16_MIN_WIDTH // 2,
                 channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), norm_groups=8,
                 dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if not param.abs().sum():
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


class AutocastSpy(torch.nn.Module):
    """Records whether each call ran under CPU autocast, then calls the wrapped model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.autocast = model, []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return self.model(x, t, **kwargs)


def generate_wide(precision: str) -> tuple[torch.Tensor, list[bool]]:
    """3 images of 3x8x8 from wide_unet, 4 DDIM steps over T=100, at ``precision``."""
    from dataclasses import replace

    from pixeldiffusion.config import Config
    from pixeldiffusion.generate import generate

    cfg = Config()
    cfg = replace(cfg, data=replace(cfg.data, channels=3, image_size=8),
                  diffusion=replace(cfg.diffusion, timesteps=100),
                  sample=replace(cfg.sample, sampler="ddim", steps=4, n_samples=3,
                                 precision=precision))
    spy = AutocastSpy(wide_unet())
    return generate(spy, cfg, CPU).images, spy.autocast


def test_auto_samples_in_bf16_on_a_native_cpu_within_the_bf16_tolerance(monkeypatch) -> None:
    """On a (faked) native-bf16 CPU, auto runs every model call of a wide model under bf16
    autocast and ends within the tolerance of the bf16 sampling test (test_fastpaths) of fp32."""
    fake_cpu(monkeypatch, avx512_bf16=True)
    images_auto, autocast = generate_wide("auto")
    assert autocast == [True] * 4
    images32, autocast32 = generate_wide("fp32")
    assert autocast32 == [False] * 4
    assert images_auto.dtype == torch.float32
    error = (images_auto - images32).abs().max()
    assert 0 < error < 0.05, f"auto (bf16) sampling is {error:.4f} from fp32 (max abs, [-1, 1])"


def test_auto_samples_in_fp32_on_an_avx2_cpu(monkeypatch) -> None:
    """On a CPU without native bf16, auto draws exactly the fp32 images, without autocast."""
    fake_cpu(monkeypatch, avx512_bf16=False)
    images_auto, autocast = generate_wide("auto")
    assert autocast == [False] * 4
    torch.testing.assert_close(images_auto, generate_wide("fp32")[0], rtol=0, atol=0)


def test_train_config_offers_auto(monkeypatch, tiny_args) -> None:
    """``--train.mixed_precision auto`` gives accelerate bf16 for a wide model on a native CPU
    and "no" for a narrow one or on an AVX2-only CPU."""
    from pixeldiffusion.config import load_config
    from pixeldiffusion.train import _make_accelerator

    fake_cpu(monkeypatch, avx512_bf16=True)
    chosen = {}
    monkeypatch.setattr("accelerate.Accelerator",
                        lambda mixed_precision, cpu: chosen.setdefault("m", []).append(
                            mixed_precision))
    wide = ["--model.channels", str(WIDE // 2), "--model.channel_mult", "1,2"]
    for extra in ([], wide):
        _make_accelerator(load_config(None, [*tiny_args, "--train.device", "cpu",
                                             "--train.mixed_precision", "auto", *extra]))
    fake_cpu(monkeypatch, avx512_bf16=False)
    _make_accelerator(load_config(None, [*tiny_args, "--train.device", "cpu",
                                         "--train.mixed_precision", "auto", *wide]))
    assert chosen["m"] == ["no", "bf16", "no"]


@pytest.mark.parametrize("name", ["mnist", "cifar10_cond", "celeba64", "cifar10_flow"])
def test_train_auto_measures_the_unet_it_trains_with_conv_width(monkeypatch, name) -> None:
    """``--train.mixed_precision auto`` asks resolve_precision about ``conv_width`` of the UNet
    the config builds (on the meta device: no weights), the width sampling uses for the same
    model, which is channels * max(channel_mult) for every shipped config."""
    import importlib
    from pathlib import Path

    from pixeldiffusion.config import load_config
    from pixeldiffusion.unet import build_unet

    train_module = importlib.import_module("pixeldiffusion.train")  # pd.train is the function
    widths = []

    def spy(requested, device, width):
        widths.append(width)
        return resolve_precision(requested, device, width)
    monkeypatch.setattr(train_module, "resolve_precision", spy)
    monkeypatch.setattr("accelerate.Accelerator", lambda mixed_precision, cpu: None)
    configs = Path(__file__).resolve().parent.parent / "configs"
    cfg = load_config(configs / f"{name}.yaml", ["--train.device", "cpu",
                                                  "--train.mixed_precision", "auto"])
    train_module._make_accelerator(cfg)
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    assert widths == [conv_width(model)] == [cfg.model.channels * max(cfg.model.channel_mult)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_args):
    from pixeldiffusion.cli import main

    run_dir = tmp_path_factory.mktemp("precision") / "run"
    assert main(["train", "-e", str(run_dir), *tiny_args, "--no_progress"]) == 0
    return run_dir


def test_sample_prints_the_choice_once(trained, tmp_path, monkeypatch, capsys) -> None:
    """``pixeldiffusion sample`` says what auto became, once, on stderr (stdout stays the list
    of written files); ``--precision fp32`` is one flag away."""
    from pixeldiffusion.cli import main

    fake_cpu(monkeypatch, avx512_bf16=True)
    common = ["sample", "-cp", str(trained), "-bs", "2", "--device", "cpu", "--sampler", "ddim",
              "--steps", "2", "-sp", str(tmp_path / "grid.png")]
    capsys.readouterr()
    assert main([*common, "--precision", "auto"]) == 0
    out, err = capsys.readouterr()
    assert err.count("precision: ") == 1
    assert "precision: auto -> fp32 (native AVX-512-BF16, but a model this narrow" in err
    assert out.strip() == str(tmp_path / "grid.png")
    assert main([*common, "--precision", "fp32"]) == 0
    assert "precision: fp32 -> fp32 (as asked)" in capsys.readouterr().err


def test_eval_prints_the_choice_once(trained, tmp_path, monkeypatch, capsys) -> None:
    from pixeldiffusion.cli import main

    fake_cpu(monkeypatch, avx512_bf16=False)
    capsys.readouterr()
    assert main(["eval", "-cp", str(trained), "-n", "8", "--micro_batch", "8", "--steps", "2",
                 "--sampler", "ddim", "--device", "cpu", "--out", str(tmp_path / "eval"),
                 "--no_progress", "--sample.precision", "auto"]) == 0
    err = capsys.readouterr().err
    assert err.count("precision: ") == 1 and "precision: auto -> fp32 (no native bf16" in err


def test_serve_prints_the_rule_at_start(trained, monkeypatch, capsys) -> None:
    pytest.importorskip("starlette", reason="the [ui] extra is not installed")
    uvicorn = pytest.importorskip("uvicorn")
    from pixeldiffusion.cli import main

    fake_cpu(monkeypatch, avx512_bf16=True, cap="AVX2")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    assert main(["serve", "-cp", str(trained), "--device", "cpu"]) == 0
    assert "precision: auto -> fp32 (no native bf16 on cpu)" in capsys.readouterr().out


def test_throughput_prints_the_machine_and_default_vs_auto() -> None:
    """``benchmarks/throughput.py --default-vs-auto`` (no diffusers needed) names the CPU and its
    bf16 flags, then one row per config with what auto picked; under ``ONEDNN_MAX_CPU_ISA=AVX2``
    it says bf16 is not native and auto is fp32."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    result = subprocess.run([sys.executable, str(script), "--default-vs-auto", "--configs",
                             "mnist", "--repeats", "1", "--warmup", "0", "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=600, check=True)
    header = result.stdout.splitlines()[0]
    assert header.startswith("machine: CPU ") and "flags: " in header
    assert "native bf16: no" in header and "ONEDNN_MAX_CPU_ISA=AVX2" in header
    assert "| mnist | 64 | fp32 (no native bf16 on cpu) |" in result.stdout
