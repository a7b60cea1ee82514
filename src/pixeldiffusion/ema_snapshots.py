"""Post-hoc EMA in a run directory (Karras et al. 2024, EDM2, Sec. 3): the tracker that training
keeps, its snapshots on disk, and an EMA of any length rebuilt from them.

    RUN/ema_snapshots/step-0001000-sigma_rel-0.050.safetensors

Each snapshot is one power-function average (``posthoc_ema.PowerEMA``) after a step: its tensors
as ``ema.*`` and, in the metadata, the step, gamma, sigma_rel and the run's config, so a snapshot
is itself a checkpoint that ``sample`` takes. ``SnapshotRecorder`` is the training side (a hook
that ``run.py`` gives the loop when train.posthoc_ema_every > 0; its tracker's averages go into
the checkpoint's training state, so a resumed run continues exactly); ``reconstruct_run`` is
the other side, behind ``pixeldiffusion ema`` and eval's ``--sweep sigma_rel=...``. The math is
in posthoc_ema.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .checkpoint import load_checkpoint, read_metadata, save_ema_weights
from .config import Config
from .errors import CheckpointError, ConfigError, PixelDiffusionError
from .posthoc_ema import (
    SIGMA_REL_MAX,
    PostHocEMA,
    Snapshot,
    fit_error,
    gamma_of_sigma_rel,
    sigma_rel_of_gamma,
    snapshot_weights,
    weighted_sum,
)

if TYPE_CHECKING:
    from .train import TrainState

SNAPSHOT_DIR = "ema_snapshots"
STATE_KEY = "posthoc_ema"  # its entry in the checkpoint's training state (state.pt)
SNAPSHOT_NAME = re.compile(r"step-(\d{7,})-sigma_rel-[\d.]+\.safetensors")
# the most a rebuilt profile may differ from the wanted one (posthoc_ema.fit_error, relative L2)
MAX_FIT_ERROR = 0.1


def snapshot_path(run_dir: Path, step: int, sigma_rel: float) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step-{step:07d}-sigma_rel-{sigma_rel:.3f}.safetensors"


def save_snapshot(run_dir: Path, snapshot: Snapshot, cfg: Config) -> Path:
    """Write one snapshot (atomically) as a weights-only checkpoint with its step, gamma and
    sigma_rel in the metadata."""
    sigma_rel = snapshot.sigma_rel
    return save_ema_weights(
        snapshot_path(run_dir, snapshot.step, sigma_rel), snapshot.state, cfg, snapshot.step,
        note=f"ema.* = post-hoc EMA snapshot: the power-function EMA of sigma_rel "
             f"{sigma_rel:.4g} (gamma {snapshot.gamma:.4g}) after step {snapshot.step}",
        metadata={"gamma": repr(snapshot.gamma), "sigma_rel": repr(sigma_rel)})


# --------------------------------------------------------------------------- training


class SnapshotRecorder:
    """The training hook: updates a ``PostHocEMA`` of the raw weights after every step (foreach
    lerps on the device, no host sync), writes its snapshots every ``every`` steps and at the end
    of the run, and keeps its averages in the checkpoint's training state. Main process only:
    every process holds the same weights.

        Hook(1, recorder, setup=recorder.setup)
    """

    def __init__(self, every: int, sigma_rels: Sequence[float]) -> None:
        if not sigma_rels:
            raise ConfigError("config key 'train.posthoc_sigma_rels' is empty but "
                              "train.posthoc_ema_every is on; give one or more widths, e.g. "
                              "0.05,0.10, or set train.posthoc_ema_every 0")
        self.every, self.sigma_rels = every, tuple(sigma_rels)
        self.tracker: PostHocEMA | None = None
        self.state: TrainState | None = None
        self.live: dict[str, Tensor] = {}
        self.step = 0   # the last step folded into the averages
        self.written = -1  # the last step whose snapshots are on disk

    def setup(self, state: TrainState) -> None:
        """Track the raw weights of this process's model from ``state.step`` on, and register
        the averages as part of the training state (restored after this, on resume)."""
        if not state.main:
            return
        # aliases of the parameters, which the optimizer updates in place
        self.live = state.accelerator.unwrap_model(state.model).state_dict()
        self.tracker = PostHocEMA(self.live, self.sigma_rels, self.every)
        self.step, self.state = state.step, state
        state.hook_states[STATE_KEY] = self

    def __call__(self, state: TrainState) -> None:
        self.catch_up(state)
        if state.done and self.written != state.step:
            self._write(state, self.tracker.snapshots(state.step))

    def catch_up(self, state: TrainState) -> None:
        """Fold in the weights of ``state.step`` unless done already (the checkpoint hook may
        ask first)."""
        if self.tracker is None or self.step == state.step:
            return
        if self.step != state.step - 1:
            raise RuntimeError(f"post-hoc EMA missed steps {self.step + 1}..{state.step - 1}")
        self.step = state.step
        self._write(state, self.tracker.update(self.live, state.step))

    def _write(self, state: TrainState, snapshots: list[Snapshot]) -> None:
        for snapshot in snapshots:
            save_snapshot(state.run_dir, snapshot, state.cfg)
        if snapshots:
            self.written = state.step

    def state_dict(self) -> dict[str, Any]:
        """The averages and their step, for the checkpoint (after folding in this step)."""
        self.catch_up(self.state)
        return {"step": self.step, **self.tracker.state_dict()}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        """The averages of the checkpoint resumed from (None: it has none, which is refused)."""
        if saved is None:
            raise ConfigError(f"the checkpoint at step {self.state.step} has no post-hoc EMA "
                              f"state, and its averages must start at step 0; continue this run "
                              f"with --train.posthoc_ema_every 0, or start a new run with it on")
        try:
            self.tracker.load_state_dict(saved)
        except ValueError as err:
            raise ConfigError(f"{err} but config key 'train.posthoc_sigma_rels' asks for "
                              f"{', '.join(f'{s:g}' for s in self.sigma_rels)}; resume with the "
                              f"run's own values (EXP_DIR/config.yaml)") from None
        self.step = int(saved["step"])


# --------------------------------------------------------------------------- reconstruction


@dataclass(frozen=True)
class SnapshotFile:
    path: Path
    step: int
    gamma: float


@dataclass
class Reconstruction:
    """An EMA rebuilt from a run's snapshots: its weights (the model's state dict), the run's
    config, the step it is the average at, how close the fit is, and the snapshots it used."""

    state: dict[str, Tensor]
    config: Config
    step: int
    sigma_rel: float
    fit_error: float
    used: list[SnapshotFile]


def list_snapshots(run_dir: str | Path) -> list[SnapshotFile]:
    """The snapshots of a run, by step (their metadata only); a PixelDiffusionError naming the
    fix when there are none."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    paths = sorted(p for p in folder.glob("step-*.safetensors") if SNAPSHOT_NAME.fullmatch(p.name))
    if not paths:
        raise PixelDiffusionError(f"'{run_dir}' has no post-hoc EMA snapshots ({folder} is "
                                  f"missing or empty); train with --train.posthoc_ema_every K "
                                  f"(e.g. 1000) to record them")
    found = []
    for path in paths:
        metadata = read_metadata(path)
        try:
            found.append(SnapshotFile(path, int(metadata["step"]), float(metadata["gamma"])))
        except (KeyError, ValueError):
            raise CheckpointError(f"'{path}' is not a post-hoc EMA snapshot (no step and gamma "
                                  f"in its metadata); move it out of {folder}") from None
    return sorted(found, key=lambda s: (s.step, s.gamma))


def check_sigma_rel(sigma_rel: float) -> float:
    """``sigma_rel`` if it is a width a power-function EMA can have, else a PixelDiffusionError."""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise PixelDiffusionError(f"sigma_rel {sigma_rel:g} is out of range; the EMA length "
                                  f"relative to training time must be in (0, {SIGMA_REL_MAX:.4f}]"
                                  f" (EDM2 uses 0.01 to 0.25; 0.05 and 0.10 are tracked by "
                                  f"default)")
    return sigma_rel


def plan_reconstruction(snapshots: list[SnapshotFile], sigma_rel: float,
                        step: int | None = None) -> tuple[list[SnapshotFile], int, float]:
    """(the snapshots to use, the step the average is at, the fit error) for an EMA of width
    ``sigma_rel`` from the snapshots up to ``step`` (default: all), at the last of them.
    Refuses a fit worse than MAX_FIT_ERROR: too few snapshots for that width."""
    check_sigma_rel(sigma_rel)
    used = [s for s in snapshots if step is None or s.step <= step]
    if not used:
        raise PixelDiffusionError(f"no post-hoc EMA snapshot at or before step {step}; the first "
                                  f"is at step {snapshots[0].step}")
    target = used[-1].step
    steps, gammas = [s.step for s in used], [s.gamma for s in used]
    error = fit_error(steps, gammas, target, gamma_of_sigma_rel(sigma_rel))
    if not error <= MAX_FIT_ERROR:
        tracked = ", ".join(sorted({f"{sigma_rel_of_gamma(g):.3g}" for g in gammas}))
        raise PixelDiffusionError(
            f"too few snapshots for sigma_rel {sigma_rel:g} at step {target}: the {len(used)} "
            f"snapshots at {len(set(steps))} step(s) fit its profile only to within "
            f"{error:.0%} (at most {MAX_FIT_ERROR:.0%} is accepted); pick a sigma_rel nearer "
            f"the tracked {tracked}, or train longer with snapshots more often "
            f"(train.posthoc_ema_every)")
    return used, target, error


def _snapshot_states(used: list[SnapshotFile], reference: dict[str, Tensor]) -> Iterator[dict]:
    """Each snapshot's ``ema.*`` tensors in turn, checked against the reference state's names
    and shapes (one snapshot in memory at a time)."""
    for snapshot in used:
        try:
            tensors = load_file(str(snapshot.path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"'{snapshot.path}' could not be read ({err}); it may be "
                                  f"truncated: move it out of the run's {SNAPSHOT_DIR}") from None
        state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        if state.keys() != reference.keys() or any(
                state[k].shape != reference[k].shape for k in reference):
            raise CheckpointError(f"'{snapshot.path}' does not fit the model of the run's newest "
                                  f"snapshot; post-hoc EMA combines snapshots of one run only")
        yield state


def reconstruct_run(run_dir: str | Path, sigma_rel: float,
                    step: int | None = None) -> Reconstruction:
    """The power-function EMA of width ``sigma_rel`` (EDM2 Alg. 3) from the snapshots of
    ``run_dir`` up to ``step`` (default: all), at the step of the last snapshot used."""
    snapshots = list_snapshots(run_dir)
    used, target, error = plan_reconstruction(snapshots, sigma_rel, step)
    newest = load_checkpoint(used[-1].path)  # the config, checked, and a model to compare with
    reference = newest.model.state_dict()
    weights = snapshot_weights([s.step for s in used], [s.gamma for s in used], target,
                               gamma_of_sigma_rel(sigma_rel))
    state = weighted_sum(weights.tolist(), _snapshot_states(used, reference))
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise CheckpointError(f"the post-hoc EMA of sigma_rel {sigma_rel:g} from '{run_dir}' has "
                              f"NaN/Inf values; a snapshot is non-finite (training diverged)")
    return Reconstruction(state, newest.config, target, sigma_rel, error, used)


def save_reconstruction(rebuilt: Reconstruction, out: str | Path) -> Path:
    """Write a reconstruction as a checkpoint (``ema.*``, the run's config), atomically."""
    gamma = gamma_of_sigma_rel(rebuilt.sigma_rel)
    return save_ema_weights(
        out, rebuilt.state, rebuilt.config, rebuilt.step,
        note=f"ema.* = post-hoc EMA of sigma_rel {rebuilt.sigma_rel:g} at step {rebuilt.step}, "
             f"rebuilt from {len(rebuilt.used)} snapshots (EDM2 Alg. 3)",
        metadata={"sigma_rel": repr(rebuilt.sigma_rel), "gamma": repr(gamma),
                  "fit_error": repr(rebuilt.fit_error),
                  "snapshots": ",".join(s.path.name for s in rebuilt.used)})


def run_dir_of(weights: Path) -> Path | None:
    """The run directory a checkpoint's weights file belongs to, if it has snapshots: the
    folder holding ``ema_snapshots/`` among the file's parent, and the run of
    RUN/checkpoints/step-N/weights.safetensors."""
    for folder in list(Path(weights).parents)[:3]:
        if (folder / SNAPSHOT_DIR).is_dir():
            return folder
    return None


def describe(rebuilt: Reconstruction) -> str:
    """One line: what was rebuilt from what."""
    steps = sorted({s.step for s in rebuilt.used})
    return (f"post-hoc EMA sigma_rel {rebuilt.sigma_rel:g} at step {rebuilt.step}: "
            f"{len(rebuilt.used)} snapshots at steps {steps[0]}..{steps[-1]}, profile fit "
            f"within {rebuilt.fit_error:.2%}")
