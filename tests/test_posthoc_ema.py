"""Post-hoc EMA (EDM2) against closed forms: sigma_rel <-> gamma, the power EMA's exact weights,
the profiles' inner product, a profile reconstructed from two others' snapshots and the fit's
error; then in a run: snapshots written during training, exact resume, the ema command and the
sigma_rel sweep of eval."""

import importlib
import math

import pytest
import torch

from pixeldiffusion.checkpoint import load_checkpoint
from pixeldiffusion.posthoc_ema import (
    SIGMA_REL_MAX,
    PostHocEMA,
    PowerEMA,
    Snapshot,
    fit_error,
    gamma_of_sigma_rel,
    power_beta,
    profile_inner_product,
    reconstruct,
    sigma_rel_of_gamma,
    snapshot_weights,
    weighted_sum,
)

F64 = torch.float64


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.07, 0.10, 0.2, SIGMA_REL_MAX])
def test_gamma_and_sigma_rel_round_trip(sigma_rel):
    gamma = gamma_of_sigma_rel(sigma_rel)
    assert gamma >= 0
    assert sigma_rel_of_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-9)


def test_the_papers_two_profiles():
    """EDM2, Sec. 3.2: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94; gamma 0 is uniform."""
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)
    assert sigma_rel_of_gamma(0.0) == pytest.approx(math.sqrt(1 / 12))
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            gamma_of_sigma_rel(bad)


def _one_hot_average(gamma, T):
    """Track theta_tau = e_tau (the tau-th basis vector): the average is the weight vector."""
    basis = torch.eye(T, dtype=F64)
    ema = PowerEMA({"w": basis[0]}, gamma)
    for t in range(1, T + 1):
        ema.update({"w": basis[t - 1]}, t)
    return ema.state["w"]


@pytest.mark.parametrize("gamma", [0.0, 2.5, gamma_of_sigma_rel(0.05)])
def test_power_ema_gives_the_integrated_power_profile_weights(gamma):
    T = 300
    tau = torch.arange(1, T + 1, dtype=F64)
    exact = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / T ** (gamma + 1)
    weights = _one_hot_average(gamma, T)
    torch.testing.assert_close(weights, exact, rtol=1e-9, atol=1e-15)
    assert weights.sum().item() == pytest.approx(1.0, rel=1e-12)
    assert power_beta(1, gamma) == 0.0


def test_power_ema_width_relative_to_t_is_sigma_rel():
    T = 4000
    weights = _one_hot_average(gamma_of_sigma_rel(0.10), T)
    u = torch.arange(1, T + 1, dtype=F64) / T
    mean = (weights * u).sum()
    std = ((weights * (u - mean) ** 2).sum()).sqrt().item()
    assert std == pytest.approx(0.10, rel=2e-3)


@pytest.mark.parametrize("t_a, gamma_a, t_b, gamma_b", [
    (100.0, 6.94, 100.0, 16.97), (40.0, 2.0, 100.0, 7.0), (100.0, 7.0, 40.0, 2.0),
    (1e6, 16.97, 3e5, 6.94)])
def test_profile_inner_product_is_the_integral(t_a, gamma_a, t_b, gamma_b):
    def profile(t, gamma, u):
        return torch.where(u <= t, (gamma + 1) * (u / t) ** gamma / t, torch.zeros_like(u))
    m = min(t_a, t_b)
    u = torch.linspace(0, m, 400_001, dtype=F64)
    numeric = torch.trapezoid(profile(t_a, gamma_a, u) * profile(t_b, gamma_b, u), u).item()
    closed = profile_inner_product(*(torch.tensor(v, dtype=F64)
                                     for v in (t_a, gamma_a, t_b, gamma_b))).item()
    assert closed == pytest.approx(numeric, rel=1e-6)


def test_a_stored_profile_is_reconstructed_from_itself():
    steps, gammas = [100, 200, 300, 100, 200, 300], [16.97] * 3 + [6.94] * 3
    weights = snapshot_weights(steps, gammas, 200, 6.94)
    torch.testing.assert_close(weights, torch.tensor([0, 0, 0, 0, 1.0, 0], dtype=F64),
                               atol=1e-6, rtol=0)


def _trajectory(T):
    """Parameters along a known path: a decay, an oscillation, a ramp and a random walk."""
    tau = torch.arange(1, T + 1, dtype=F64)
    walk = torch.randn(T, dtype=F64, generator=torch.Generator().manual_seed(0)).cumsum(0)
    return torch.stack([torch.exp(-tau / 300), torch.sin(tau / 150), (tau / T) ** 2,
                        walk / math.sqrt(T)], dim=1)


def test_a_profile_tracked_in_training_matches_its_post_hoc_reconstruction():
    """Track sigma_rel 0.05 and 0.10 with snapshots every 100 of 2000 steps, and 0.07 directly;
    the 0.07 average rebuilt from the snapshots matches, at the end and at an earlier step."""
    T, every = 2000, 100
    theta = _trajectory(T)
    tracker = PostHocEMA({"w": theta[0], "n": torch.tensor(0)}, sigma_rels=(0.05, 0.10),
                         every=every)
    direct = PowerEMA({"w": theta[0]}, gamma_of_sigma_rel(0.07))
    snapshots, at_1200 = [], None
    for t in range(1, T + 1):
        snapshots += tracker.update({"w": theta[t - 1], "n": torch.tensor(t)}, t)
        direct.update({"w": theta[t - 1]}, t)
        if t == 1200:
            at_1200 = direct.state["w"].clone()
    assert [s.step for s in snapshots] == [k * every for k in range(1, 21) for _ in range(2)]
    rebuilt = reconstruct(snapshots, 0.07)
    torch.testing.assert_close(rebuilt["w"], direct.state["w"], atol=2e-4, rtol=0)
    assert rebuilt["w"].dtype == F64 and rebuilt["n"].item() == T
    rebuilt_1200 = reconstruct([s for s in snapshots if s.step <= 1200], 0.07, step=1200)
    torch.testing.assert_close(rebuilt_1200["w"], at_1200, atol=2e-4, rtol=0)
    # the reconstruction is a real fit, not one of the stored averages
    assert (rebuilt["w"] - snapshots[-1].state["w"]).abs().max() > 1e-3


def test_snapshots_are_copies_in_the_tracked_dtype():
    state = {"w": torch.zeros(3), "count": torch.tensor(0)}
    tracker = PostHocEMA(state, every=2)
    assert tracker.update({"w": torch.ones(3), "count": torch.tensor(1)}, 1) == []
    snaps = tracker.update({"w": torch.full((3,), 3.0), "count": torch.tensor(2)}, 2)
    assert [round(s.sigma_rel, 6) for s in snaps] == [0.05, 0.1]
    first = snaps[0].state["w"].clone()
    tracker.update({"w": torch.full((3,), 9.0), "count": torch.tensor(3)}, 3)
    assert torch.equal(snaps[0].state["w"], first)  # not aliased to the running average
    assert snaps[0].state["w"].dtype == torch.float32 and snaps[0].state["count"].item() == 2
    assert state["w"].sum().item() == 0  # the caller's tensors are never written
    with pytest.raises(ValueError, match="at least one snapshot"):
        reconstruct([], 0.07)
    with pytest.raises(ValueError, match="every K >= 1"):
        PostHocEMA(state, every=0)


def test_fit_error_is_zero_for_a_stored_profile_and_grows_with_fewer_snapshots():
    g5, g10 = gamma_of_sigma_rel(0.05), gamma_of_sigma_rel(0.10)

    def error(n, sigma_rel):
        steps = [1000 * (k + 1) // n for k in range(n)] * 2
        return fit_error(steps, [g5] * n + [g10] * n, 1000, gamma_of_sigma_rel(sigma_rel))

    assert error(5, 0.10) == pytest.approx(0, abs=1e-6)
    assert error(40, 0.15) < error(10, 0.15) < error(2, 0.15)
    assert error(2, 0.25) > 0.3  # far outside the tracked widths: not representable
    # the closed form against the profiles integrated numerically
    steps, gammas, target = [500, 1000, 500, 1000], [g5, g5, g10, g10], 1000
    x = snapshot_weights(steps, gammas, target, gamma_of_sigma_rel(0.2))
    u = torch.linspace(0, target, 200_001, dtype=F64)

    def profile(t, gamma):
        return torch.where(u <= t, (gamma + 1) * (u / t) ** gamma / t, torch.zeros_like(u))
    fitted = sum(float(w) * profile(t, g) for w, t, g in zip(x, steps, gammas, strict=True))
    wanted = profile(target, gamma_of_sigma_rel(0.2))
    numeric = (torch.trapezoid((fitted - wanted) ** 2, u) / torch.trapezoid(wanted**2, u)).sqrt()
    assert fit_error(steps, gammas, target, gamma_of_sigma_rel(0.2)) == pytest.approx(
        numeric.item(), rel=1e-3)


def test_weighted_sum_streams_and_matches_reconstruct():
    states = [{"w": torch.full((2,), float(k)), "n": torch.tensor(k)} for k in range(1, 4)]
    snapshots = [Snapshot(100 * k, g, s) for k, (g, s) in
                 enumerate(zip([6.94, 16.97, 6.94], states, strict=True), start=1)]
    weights = snapshot_weights([s.step for s in snapshots], [s.gamma for s in snapshots], 300,
                               gamma_of_sigma_rel(0.07))
    streamed = weighted_sum(weights.tolist(), (s for s in states))  # a generator
    torch.testing.assert_close(streamed["w"], reconstruct(snapshots, 0.07)["w"])
    assert streamed["n"].item() == 3
    torch.testing.assert_close(streamed["w"], torch.full((2,), float(weights @ torch.tensor(
        [1.0, 2.0, 3.0], dtype=F64))), rtol=1e-6, atol=0)


def test_the_config_bound_is_the_uniform_average():
    from pixeldiffusion.config import TrainConfig

    field = TrainConfig.__dataclass_fields__["posthoc_sigma_rels"]
    assert field.metadata["high"] == SIGMA_REL_MAX


def test_the_tracker_state_round_trips_and_refuses_other_profiles():
    tracker = PostHocEMA({"w": torch.zeros(3)}, every=2)
    for t in range(1, 4):
        tracker.update({"w": torch.full((3,), float(t))}, t)
    other = PostHocEMA({"w": torch.zeros(3)}, every=5)
    other.load_state_dict(tracker.state_dict())
    for a, b in zip(other.averages, tracker.averages, strict=True):
        assert torch.equal(a.state["w"], b.state["w"]) and a.gamma == b.gamma
    with pytest.raises(ValueError, match="tracks sigma_rel 0.05, 0.1"):
        PostHocEMA({"w": torch.zeros(3)}, sigma_rels=(0.2,)).load_state_dict(tracker.state_dict())


# --------------------------------------------------------------------------- in a training run


def _snapshot_files(run):
    return sorted(p.name for p in (run / "ema_snapshots").glob("*.safetensors"))


def _train(run, args, *, steps, resume=None, hooks=()):
    from pixeldiffusion.config import load_config
    from pixeldiffusion.run import default_hooks

    loop = importlib.import_module("pixeldiffusion.train")
    cfg = load_config(None, args + ["--train.steps", str(steps)])
    return loop.train(cfg, run, resume=resume, progress=False, log=lambda *_: None,
                      hooks=[*default_hooks(cfg), *hooks])


POSTHOC = ["--train.posthoc_ema_every", "2", "--train.lr", "0.01"]


def test_training_tracks_every_step_and_writes_snapshots(tmp_path, tiny_args):
    """The snapshots of a 5-step run are at steps 2, 4 and 5 (the end), each the power EMA of the
    raw weights after every step, with step, gamma and sigma_rel in the metadata."""
    from safetensors import safe_open

    loop = importlib.import_module("pixeldiffusion.train")
    seen = []

    def record(state):
        seen.append({k: v.clone() for k, v in
                     state.accelerator.unwrap_model(state.model).state_dict().items()})

    run = tmp_path / "run"
    _train(run, tiny_args + POSTHOC, steps=5, hooks=[loop.Hook(1, record)])
    assert _snapshot_files(run) == [f"step-{s:07d}-sigma_rel-{w}.safetensors"
                                    for s in (2, 4, 5) for w in ("0.050", "0.100")]
    path = run / "ema_snapshots" / "step-0000004-sigma_rel-0.100.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["step"] == "4" and float(metadata["sigma_rel"]) == pytest.approx(0.10)
    assert float(metadata["gamma"]) == pytest.approx(gamma_of_sigma_rel(0.10))
    direct = PowerEMA(seen[0], gamma_of_sigma_rel(0.10))
    for t in range(1, 5):
        direct.update(seen[t - 1], t)
    snapshot = load_checkpoint(path).model.state_dict()  # a snapshot is a checkpoint too
    for name, value in direct.state.items():
        torch.testing.assert_close(snapshot[name], value.cpu(), rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(snapshot["conv_in.weight"], seen[3]["conv_in.weight"])


def test_resume_continues_the_tracker_exactly(tmp_path, tiny_args):
    """6 steps straight == 3 steps, stop, resume to 6: the same snapshots bit for bit and the same
    tracker state in the final checkpoint (dropout on, so the RNGs matter too)."""
    from safetensors.torch import load_file

    args = tiny_args + POSTHOC
    straight = _train(tmp_path / "a", args, steps=6)
    _train(tmp_path / "b", args, steps=3)
    resumed = _train(tmp_path / "b", args, steps=6, resume="auto")
    names = _snapshot_files(tmp_path / "a")
    assert set(names) <= set(_snapshot_files(tmp_path / "b"))  # b also has its end at step 3
    for name in names:
        a = load_file(str(tmp_path / "a" / "ema_snapshots" / name))
        b = load_file(str(tmp_path / "b" / "ema_snapshots" / name))
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    state_a = torch.load(straight.checkpoint / "state.pt", weights_only=True)["posthoc_ema"]
    state_b = torch.load(resumed.checkpoint / "state.pt", weights_only=True)["posthoc_ema"]
    assert state_a["step"] == state_b["step"] == 6 and state_a["gammas"] == state_b["gammas"]
    for avg_a, avg_b in zip(state_a["averages"], state_b["averages"], strict=True):
        assert all(torch.equal(avg_a[k], avg_b[k]) for k in avg_a)


def test_resuming_a_run_without_the_tracker_is_refused(tmp_path, tiny_args):
    from pixeldiffusion.errors import ConfigError

    run = tmp_path / "run"
    _train(run, tiny_args, steps=2)
    with pytest.raises(ConfigError, match="posthoc_ema_every 0"):
        _train(run, tiny_args + POSTHOC, steps=4, resume="auto")
    tracked = tmp_path / "tracked"
    _train(tracked, tiny_args + POSTHOC, steps=2)
    with pytest.raises(ConfigError, match="posthoc_sigma_rels' asks for 0.2"):
        _train(tracked, tiny_args + POSTHOC + ["--train.posthoc_sigma_rels", "0.2"], steps=4,
               resume="auto")
    assert _train(tracked, tiny_args + POSTHOC, steps=4, resume="auto").step == 4


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_args):
    """A tiny run with snapshots every 2 of 8 steps."""
    run = tmp_path_factory.mktemp("posthoc") / "run"
    _train(run, tiny_args + POSTHOC + ["--train.save_every", "4"], steps=8)
    return run


def test_the_ema_command_writes_a_checkpoint_sample_takes(recorded, tmp_path, capsys):
    from pixeldiffusion.cli import main
    from pixeldiffusion.ema_snapshots import reconstruct_run

    out = tmp_path / "ema.safetensors"
    assert main(["ema", str(recorded), "--sigma_rel", "0.07", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "post-hoc EMA sigma_rel 0.07 at step 8: 8 snapshots at steps 2..8" in captured.err
    loaded = load_checkpoint(out)
    assert loaded.step == 8
    assert loaded.config == load_checkpoint(recorded).config  # the run's config metadata
    rebuilt = reconstruct_run(recorded, 0.07)
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, rebuilt.state[name], rtol=0, atol=0)
    # a tracked width is its snapshot; an earlier --step uses the snapshots up to it
    at_4 = reconstruct_run(recorded, 0.10, step=5)
    assert at_4.step == 4 and [s.step for s in at_4.used] == [2, 2, 4, 4]
    snapshot = load_checkpoint(recorded / "ema_snapshots" /
                               "step-0000004-sigma_rel-0.100.safetensors").model.state_dict()
    for name, value in snapshot.items():
        torch.testing.assert_close(at_4.state[name], value, rtol=0, atol=1e-6)
    assert main(["sample", "-cp", str(out), "-bs", "2", "--steps", "2", "--device", "cpu",
                 "-sp", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--sigma_rel", "0.3"], "sigma_rel 0.3 is out of range"),
    (["--sigma_rel", "0"], "sigma_rel 0 is out of range"),
    (["--sigma_rel", "0.25"], "too few snapshots for sigma_rel 0.25 at step 8"),
    (["--sigma_rel", "0.05", "--step", "1"], "no post-hoc EMA snapshot at or before step 1"),
])
def test_the_ema_command_refuses_clearly(recorded, tmp_path, capsys, args, message):
    from pixeldiffusion.cli import main

    out = tmp_path / "ema.safetensors"
    assert main(["ema", str(recorded), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_the_ema_command_needs_snapshots(tmp_path, tiny_args, capsys):
    from pixeldiffusion.cli import main

    run = tmp_path / "run"
    _train(run, tiny_args, steps=1)
    assert main(["ema", str(run), "--sigma_rel", "0.05", "-o", str(tmp_path / "e.st")]) == 2
    assert "has no post-hoc EMA snapshots" in capsys.readouterr().err


def test_eval_sweeps_the_ema_length(recorded, tmp_path, capsys):
    """sigma_rel in --sweep loads each length's reconstruction at the checkpoint's step."""
    from pixeldiffusion.cli import main
    from pixeldiffusion.ema_snapshots import reconstruct_run
    from pixeldiffusion.evaluate import PostHocWeights

    checkpoint = recorded / "checkpoints" / "step-0000004"
    loaded = load_checkpoint(checkpoint)
    weights = PostHocWeights(loaded, ["0.05", "0.07"])
    weights.load("0.07")
    expected = reconstruct_run(recorded, 0.07, step=4).state
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    code = main(["eval", "-cp", str(recorded), "--sweep", "sigma_rel=0.05,0.07", "-n", "4",
                 "--micro_batch", "4", "--sampler", "ddim", "--steps", "2", "--out",
                 str(tmp_path / "ev"), "--no_progress"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].split().index("sigma_rel")
    assert [line.split()[column] for line in lines[1:3]] == ["0.05", "0.07"]
    assert main(["eval", "-cp", str(recorded), "--sweep", "sigma_rel=0.25", "-n", "4",
                 "--out", str(tmp_path / "ev2")]) == 2
    assert "too few snapshots" in capsys.readouterr().err
