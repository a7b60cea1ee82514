"""``pixeldiffusion sample`` with every sampler, spacing options, GIFs and impossible arguments.

Runs ``cli.main`` in-process (the function the console script calls) to keep the suite fast; one
tiny model is trained once for the module.
"""

import functools

import numpy as np
import pytest
import yaml
from PIL import Image

from pixeldiffusion.cli import main
from pixeldiffusion.samplers import SAMPLERS


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_args):
    run_dir = tmp_path_factory.mktemp("sample_cli") / "run"
    assert main(["train", "-e", str(run_dir), *tiny_args, "--no_progress"]) == 0
    return run_dir


def sample(trained, tmp_path, *extra, name="grid.png"):
    return main(["sample", "-cp", str(trained), "-bs", "4", "--nrow", "2", "--device", "cpu",
                 "-sp", str(tmp_path / name), *map(str, extra)])


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_samples_a_tiny_model(trained, tmp_path, sampler, capsys):
    assert sample(trained, tmp_path, "--sampler", sampler, "--steps", "3", "--seed", "2") == 0
    assert Image.open(tmp_path / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)
    assert str(tmp_path / "grid.png") in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["denoise", "progressive"])
def test_chain_modes_and_gif_work_for_a_multistep_sampler(trained, tmp_path, mode):
    gif = tmp_path / "chain.gif"
    assert sample(trained, tmp_path, "--sampler", "unipc", "--steps", "4", "--spacing", "karras",
                  "--mode", mode, "--interval", "1", "--gif", gif) == 0
    assert Image.open(tmp_path / "grid.png").size == (5 * 34 + 2, 4 * 34 + 2)  # 4 steps + x_0
    animation = Image.open(gif)
    assert animation.format == "GIF" and animation.size == (2 * 34 + 2, 2 * 34 + 2)
    # 5 frames; Pillow merges a frame equal to the one before (progressive: the last predicted
    # x0 is x_0) into it, adding up the durations
    assert animation.n_frames == (5 if mode == "denoise" else 4)
    durations = []
    for k in range(animation.n_frames):
        animation.seek(k)
        durations.append(animation.info["duration"])
    assert sum(durations) == 4 * 80 + 1500


def test_gif_with_plain_sampling_keeps_the_plain_grid(trained, tmp_path):
    gif = tmp_path / "chain.gif"
    assert sample(trained, tmp_path, "--sampler", "heun", "--steps", "3", "--gif", gif) == 0
    assert Image.open(tmp_path / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)
    assert Image.open(gif).n_frames == 4


def test_spacing_options_and_the_deprecated_skip_type(trained, tmp_path):
    for extra in (["--spacing", "logsnr", "--order", "2", "--variant", "bh1"],
                  ["--spacing", "40,20,5"], ["--skip_type", "quadratic"],
                  ["--sampler", "ddim", "--dynamic_threshold", "0.995"]):
        assert sample(trained, tmp_path, "--steps", "3", *extra) == 0, extra
    a, b = (tmp_path / "a.png", tmp_path / "b.png")
    sample(trained, tmp_path, "--sampler", "ddim", "--steps", "3", "--skip_type", "leading",
           name=a.name)
    sample(trained, tmp_path, "--sampler", "ddim", "--steps", "3", "--spacing", "leading",
           name=b.name)
    assert a.read_bytes() == b.read_bytes()


def test_an_old_config_with_skip_type_still_loads(tmp_path):
    from pixeldiffusion.config import load_config
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"sample": {"skip_type": "quadratic"}}))
    assert load_config(path).sample.spacing == "quadratic"


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "euler_ancestral", "ddim"])
def test_eta_reaches_every_sampler_that_takes_it(trained, tmp_path, sampler, monkeypatch):
    """``--eta`` goes to each sampler with an ``eta`` option, not only DDIM: it reaches the
    function and changes the images (unset, each keeps its own default: 1 for the ancestral /
    SDE samplers, so --eta 0.5 differs from no --eta and from --eta 0)."""
    seen = []
    real = SAMPLERS[sampler]

    @functools.wraps(real)  # keeps the signature, from which the sampler's options are read
    def spy(*args, **kwargs):
        seen.append(kwargs.get("eta"))
        return real(*args, **kwargs)
    monkeypatch.setitem(SAMPLERS, sampler, spy)
    images = {}
    for eta in (None, "0.5", "0"):
        out = tmp_path / f"eta-{eta}"
        extra = [] if eta is None else ["--eta", eta]
        assert sample(trained, tmp_path, "--sampler", sampler, "--steps", "4", "--seed", "1",
                      "--save_dir", out, *extra) == 0
        images[eta] = np.load(out / "samples.npz")["images"]
    assert seen == [None, 0.5, 0.0]
    assert not np.array_equal(images["0.5"], images["0"])
    if sampler != "ddim":  # ddim's own eta is 0
        assert not np.array_equal(images["0.5"], images[None])
    else:
        assert np.array_equal(images[None], images["0"])


def test_steps_zero_is_refused_by_the_parser(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample(trained, tmp_path, "--steps", "0")
    assert exit_info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "ddpm", "--steps", "51"], "is more than the model's 50 timesteps"),
    (["--sampler", "unipcc"], "did you mean 'unipc'"),
    (["--spacing", "karas"], "did you mean 'karras'"),
    (["--spacing", "10,30"], "strictly decreasing"),
])
def test_impossible_arguments_give_one_clear_message(trained, tmp_path, capsys, extra, message):
    assert sample(trained, tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixeldiffusion: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_optimal_spacing_is_fitted_printed_and_reusable(trained, tmp_path, capsys):
    common = ["sample", "-cp", str(trained), "-bs", "4", "--device", "cpu", "--sampler", "unipc",
              "--order", "2", "--seed", "3"]
    capsys.readouterr()
    assert main([*common, "--steps", "4", "--spacing", "optimal", "--save_dir",
                 str(tmp_path / "a"), "-sp", str(tmp_path / "a.png")]) == 0
    printed = capsys.readouterr().err
    listed = printed.split("--spacing ")[1].split()[0]
    assert printed.startswith("optimal timesteps") and len(listed.split(",")) == 4
    assert main([*common, "--spacing", listed, "--save_dir", str(tmp_path / "b"),
                 "-sp", str(tmp_path / "b.png")]) == 0
    a, b = (np.load(tmp_path / d / "samples.npz")["images"].astype(int) for d in "ab")
    assert np.abs(a - b).max() <= 1  # the printed list is rounded to 0.01 of a timestep


def test_precision_and_compile_flags_reach_the_sampler(trained, tmp_path):
    """``--precision bf16`` samples under bf16 autocast, within a few grey levels of fp32, and
    ``--compile false`` is the eager default; a dtype that is not offered is refused."""
    common = ["sample", "-cp", str(trained), "-bs", "4", "--device", "cpu", "--sampler", "ddim",
              "--steps", "3"]
    for name, extra in (("fp32", ["--compile", "false"]), ("bf16", ["--precision", "bf16"])):
        assert main([*common, *extra, "--save_dir", str(tmp_path / name),
                     "-sp", str(tmp_path / f"{name}.png")]) == 0
    a, b = (np.load(tmp_path / d / "samples.npz")["images"].astype(int) for d in ("fp32", "bf16"))
    assert 0 < np.abs(a - b).max() <= 16
    with pytest.raises(SystemExit):
        main([*common, "--precision", "fp8", "-sp", str(tmp_path / "x.png")])
