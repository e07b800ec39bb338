"""The learn stage: concurrent learning of the DP potential and of the shift model (DP-GEN)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.base import Spec, SpecError
from schemas.potential import DpTrainingSpec


class BootstrapSpec(Spec):
    """The first training set: perturbed copies of every system's structure, labelled."""

    frames_per_system: int = Field(default=40, ge=1)
    """Perturbed copies of each system's (supercell) structure (dpdata's ``perturb``)."""
    displacement_a: float = Field(default=0.15, gt=0, le=1.0)
    """RMS random displacement of an atom (A; dpdata ``atom_pert_distance``, style ``normal``:
    a Gaussian of width displacement_a / sqrt(3) per component). It should cover the thermal
    displacements of the exploration: with 0.05 A the first models of the P2-NMMO oracle
    campaign disagreed by 0.4-1.5 eV/A over 300-900 K md, so nothing fell below trust_hi."""
    cell_strain: float = Field(default=0.02, ge=0, lt=0.2)
    """Largest random cell deformation (dpdata ``cell_pert_fraction``: each strain component
    drawn uniformly in +-this)."""


class ExploreSpec(Spec):
    """The exploration md of one iteration: every system at every temperature."""

    temperatures_k: list[float] = Field(default=[300.0, 600.0, 900.0], min_length=1)
    """Thermostat temperatures (K, > 0); one trajectory per system and temperature."""
    steps: list[int] = Field(default=[2000, 4000, 8000, 16000, 16000, 16000], min_length=1)
    """MD steps per trajectory in iteration i (the last entry for later iterations): growing,
    as DP-GEN's ``nsteps`` per iteration."""
    save_every_steps: int = Field(default=20, ge=1)
    """Steps between the frames whose model deviation is computed (the candidates)."""
    timestep_fs: float = Field(default=1.0, gt=0)
    """Integration time step (fs)."""
    thermostat_time_fs: float = Field(default=100.0, gt=0)
    """Nose-Hoover chain damping time (fs)."""

    @model_validator(mode="after")
    def _check(self) -> "ExploreSpec":
        problems = []
        if any(not t > 0 for t in self.temperatures_k):
            problems.append(("temperatures_k", f"every temperature > 0 K (got "
                                               f"{self.temperatures_k})"))
        if any(s < 1 for s in self.steps):
            problems.append(("steps", f"every entry >= 1 (got {self.steps})"))
        if problems:
            raise SpecError(*problems)
        return self


class ShiftLearnSpec(Spec):
    """The shift model of the campaign: GPR on SOAP, labels chosen by its own uncertainty."""

    budget_per_iteration: int = Field(default=10, ge=0)
    """Explored frames per system and iteration labelled for the shift model, besides the
    frames the DP deviation selects (whose A_iso comes with their single point anyway): with
    the linear kernel (zeta 1) one at a time, each the frame whose labels most reduce the
    summed posterior variance of the pool given every label and every pick before it (greedy
    V-optimal, :func:`jobs.shiftmodels.gpr.variance_reduction_picks`); with zeta >= 2 the frames of
    largest mean predicted variance."""
    selection_regularisation: float = Field(default=1e-2, gt=0)
    """lambda (noise / prior variance) of the GP that scores the V-optimal picks: about the
    labels' noise-to-signal ratio (P2-NMMO: (49 ppm CV error / 626 ppm spread)^2 = 6e-3),
    not the fit's CV-chosen lambda, which treats the labels as nearly exact (on one P2-NMMO
    split 1e-3 and 1e-2 picked at least as well as the fit's 1e-6; docs/gpr.md)."""
    pool_frames: int = Field(default=200, ge=1)
    """Explored frames per system (below trust_hi, evenly spread over temperature and time)
    that compete for that budget and over which the variance is summed; memory ~2 x 8 (16 x
    pool_frames)^2 bytes for 16 target nuclei per frame (200: 164 MB)."""
    soap_r_cut_a: float = Field(default=8.5, gt=1)
    """SOAP cutoff of the campaign's GPR shift model (A; P2-NMMO CV: 8.5, docs/gpr.md)."""
    soap_sigma_a: float = Field(default=0.5, gt=0)
    """Width of the SOAP Gaussians (A)."""
    soap_n_max: int = Field(default=10, ge=1)
    """Radial basis functions of SOAP."""
    soap_l_max: int = Field(default=9, ge=0, le=20)
    """Maximum degree of the spherical harmonics of SOAP."""
    zeta: int = Field(default=1, ge=1)
    """Kernel exponent (1: the weight-space linear kernel, the P2-NMMO CV's choice)."""
    regularisation: float = Field(default=1e-6, gt=0)
    """lambda = sigma_n^2 / sigma_f^2 (1e-6: the CV choice at 50-100 frames, docs/gpr.md)."""
    n_sparse: int = Field(default=3000, ge=1)
    """Sparse environments when zeta >= 2."""
    folds: int = Field(default=5, ge=2)
    """Frame-level folds of the cross validation that calibrates the model's sigma."""


class LearnDpSpec(DpTrainingSpec):
    """How every DP model of a learn iteration is trained: the potential section's knobs, with
    fewer steps and a higher final learning rate (every iteration trains its ensemble from
    scratch on a growing set)."""

    steps: int = Field(default=38000, ge=1)
    """Training steps (batches of one frame) of each model in each iteration. 38000: the
    members' spread is what the stop rule reads, and it falls with training, not with data.
    Measured on the P2-NMMO oracle campaign (docs/learn.md): at 16000 steps the accurate
    fraction stalled at 0.32-0.43 over 6 iterations; at 38000 it was 0.53, 0.91, 0.96, 0.94,
    0.92, 0.93 (~10 min per model at 1 thread; ensemble 0.012 eV/A against the oracle)."""
    steps_per_iteration: list[int] | None = None
    """Training steps of each model in iteration i (the last entry for later iterations), as
    `explore.steps`; null: `steps` in every iteration. Iteration 0 trains on the bootstrap
    frames alone, whose models only have to explore stably and pick frames: a shorter first
    training there buys time without touching the models the stop rule reads later."""
    decay_steps: int = Field(default=400, ge=1)
    """Steps between learning-rate decays (start_lr to stop_lr over the steps)."""
    stop_lr: float = Field(default=1e-4, gt=0)
    """Learning rate at the last step. 1e-4, not the potential section's 1e-5: a campaign's
    short training is still far from converged, and its steps buy more at a higher rate than
    in a fine final descent. Measured on 240 frames of the oracle campaign, 16000 steps from
    1e-3 (docs/learn.md): force RMSE against the oracle 0.0068 eV/A down to 1e-4, 0.0102 to
    3e-5, 0.0175 to 1e-5, 0.036 to 1e-6 (energy 0.07-0.31 meV/atom, best at 1e-4)."""
    compress: Literal["auto", "always", "never"] = "never"
    """`dp compress` each model: never by default (a model is retrained the next iteration, and
    a reused model must be the uncompressed frozen one)."""

    def steps_at(self, iteration: int) -> int:
        """Training steps of each model in `iteration` (0-based)."""
        if not self.steps_per_iteration:
            return self.steps
        return self.steps_per_iteration[min(iteration, len(self.steps_per_iteration) - 1)]

    def _problems(self) -> list[tuple[str, str]]:
        problems = []
        if self.steps_per_iteration is not None and (
                not self.steps_per_iteration or min(self.steps_per_iteration) < 1):
            problems.append(("steps_per_iteration", f"one or more entries, every entry >= 1 "
                                                    f"(got {self.steps_per_iteration})"))
        return problems + super()._problems()


class LearnSpec(Spec):
    """Concurrent learning (DP-GEN): train an ensemble of DP models, explore by md with one,
    measure the ensemble's force deviation at every saved frame, label the frames of moderate
    deviation (and those whose shifts the shift model is least sure of) with the label
    section's labeller, and repeat until the exploration stays accurate (docs/learn.md)."""

    reuse_models: bool = False
    """From iteration 1 on, model k starts from the previous iteration's model k
    (``dp train --init-frz-model``; DP-GEN's ``training_init_model``) and trains
    `reuse_steps` steps from `reuse_start_lr`, instead of `dp.steps` from scratch. Off by
    default: measured on the P2-NMMO oracle campaign (docs/learn.md), members built up by
    reuse (8000 + 5 x 6000 steps) ended at 0.013-0.033 eV/A against the oracle, one model
    trained once from scratch on the same 240 frames at 0.0037 (38,000 steps)."""
    reuse_steps: int = Field(default=2000, ge=1)
    """Training steps of a reused model (DP-GEN ``training_reuse_numb_steps``)."""
    reuse_start_lr: float = Field(default=1e-4, gt=0)
    """Starting learning rate of a reused model (DP-GEN ``training_reuse_start_lr``)."""
    models: int = Field(default=4, ge=2)
    """DP models of the ensemble (different seeds, same data); trained in parallel, one per
    rank where ranks allow."""
    dp: LearnDpSpec = LearnDpSpec()
    """How every model of the ensemble is trained (from scratch, each iteration)."""
    bootstrap: BootstrapSpec = BootstrapSpec()
    """The first training set."""
    explore: ExploreSpec = ExploreSpec()
    """The exploration md."""
    trust_lo_ev_a: float = Field(default=0.05, gt=0)
    """Frames with a force deviation below this are accurate (DP-GEN model_devi_f_trust_lo)."""
    trust_hi_ev_a: float = Field(default=0.15, gt=0)
    """Frames at or above this are failed (counted, not labelled: the model is too far out
    for a label to be trusted to help; DP-GEN model_devi_f_trust_hi)."""
    max_candidates_per_system: int = Field(default=20, ge=1)
    """At most this many candidate frames (trust_lo <= deviation < trust_hi) of each system
    are labelled per iteration, spread evenly over temperature and time."""
    accurate_fraction: float = Field(default=0.95, gt=0, le=1)
    """The loop stops when this fraction of the explored frames is accurate in two successive
    iterations."""
    max_iterations: int = Field(default=6, ge=1)
    """The loop stops after this many iterations in any case (the reason is recorded)."""
    shift: ShiftLearnSpec = ShiftLearnSpec()
    """The campaign's shift model and its labels chosen by disagreement."""
    validation_fraction: float = Field(default=0.1, ge=0, lt=0.5)
    """Fraction of the labelled frames of each system kept out of DP training (the energy /
    force RMSE of each iteration's models is measured on them)."""

    @model_validator(mode="after")
    def _check(self) -> "LearnSpec":
        problems = []
        if not self.trust_lo_ev_a < self.trust_hi_ev_a:
            problems.append(("trust_hi_ev_a", f"must be > trust_lo_ev_a (got "
                                              f"{self.trust_hi_ev_a} <= {self.trust_lo_ev_a})"))
        if self.reuse_models and self.reuse_start_lr < self.dp.stop_lr:
            problems.append(("reuse_start_lr", f"must be >= dp.stop_lr, where a reused model's "
                                               f"learning rate ends (got {self.reuse_start_lr} "
                                               f"< {self.dp.stop_lr})"))
        if problems:
            raise SpecError(*problems)
        return self
