"""Sampling methods by name and their typed configs: unguided, boost-and-skip, JEPA guidance, self-guided
minority sampling, MinorityPrompt.

``METHODS`` is the one method table: each row a light ``MethodSpec`` naming the ``sampling.Method``
class that runs it (imported on first use by ``method_class``) and the facts the config checks and
the pipeline read without loading it. A new method is one new module plus one row here (and its typed
config section, when it has knobs); the sampling loop, the checks and the Ray actor stay as they are.

Defaults follow the authors' release (docs/method.md, 'Guided step' and the sections after it):
eta 0.5, constant schedule, L-inf normalisation, tau 0.8, interval 1, pre-step placement, k 9,
oversample 2, 2 power iterations. Boost-and-skip: docs/method.md, 'Baselines'; SGMS: 'Self-guided minority
sampling'; MinorityPrompt: 'MinorityPrompt'.
Light to import (no torch): configs are built and checked before anything heavy loads.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from guidance.checks import check_sketch

SAMPLERS = ("ddpm", "ddim")  # the update rules (guidance/schedules.py)
GUIDANCE_SCHEDULES = ("constant", "variance")
PLACEMENTS = ("pre-step", "posterior-mean")
GRADIENTS = ("full", "tweedie")
DIRECTIONS = ("descend", "ascend", "random")  # the method, and its two controls (docs/method.md, 'Controls')
PROJECTIONS = ("none", "renoise")  # the manifold-constrained step (docs/method.md, 'Manifold-constrained step')
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SGMS_DISTANCES = ("pixels", "lpips")  # the minority score's distance (guidance/sgms.py)


def _finite_at_least(name: str, value: float, least: float, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < least:
        raise ValueError(f"{name} must be a finite number >= {least}{meaning}, got {value!r}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def deferral_window(tau: float, tau_stop: float, total: int) -> list[bool]:
    """Which of ``total`` steps (s = 0 the noisiest) satisfy tau_stop < 1 - s/T <= tau (docs/method.md,
    'Deferral and interval')."""
    # Exactly, in rationals of the decimals: 1 - s/T <= tau  <=>  T - s <= tau * T (floats drop boundary steps).
    tau, tau_stop = Fraction(repr(float(tau))), Fraction(repr(float(tau_stop)))
    return [tau_stop * total < total - s <= tau * total for s in range(total)]


@dataclass(frozen=True)
class GuidanceConfig:
    """JEPA guidance: descend on the top-k log-volume of the decoded Tweedie estimate."""

    eta: float = 0.5
    """strength: the step is eta * g (or eta * beta-tilde_t * g); 0 never guides"""
    schedule: str = "constant"
    """"constant" or "variance" (scale by the DDPM posterior variance)"""
    normalize: bool = True
    """divide g by its per-sample max |g| (L-inf normalisation)"""
    tau: float = 0.8
    """deferral: guide step s of T only when 1 - s/T <= tau (0 never, 1 from the start)"""
    tau_stop: float = 0.0
    """stop guiding once 1 - s/T <= tau_stop, before the lowest noise levels (0 guides to the end)"""
    interval: int = 1
    """guide every interval-th step once deferral allows"""
    placement: str = "pre-step"
    """"pre-step": x_t -= step, then the sampler step; "posterior-mean": mean -= step"""
    k: int = 9
    """top-k singular values in the log-volume"""
    oversample: int = 2
    """extra sketch columns (r = k + oversample)"""
    power_iters: int = 2
    """subspace iterations of the sketch"""
    warm_start: bool = False
    """start each guided step's sketch from the previous step's subspace (method jepa)"""
    gradient: str = "full"
    """"full": through the denoiser; "tweedie": network output held constant (no denoiser backward)"""
    micro_batch: int | None = None
    """rows per encoder-branch chunk (bounds its double-backward memory); None: the batch"""
    rescale_interval: bool = False
    """with interval n, the step is n * eta: guiding every n-th step keeps the total push"""
    reuse_direction: bool = False
    """steps between guided ones apply the last guided direction again (no encoder call)"""
    direction: str = "descend"
    """"descend" (the method); controls: "ascend" (reversed), "random" (same norm, random direction)"""
    project: str = "none"
    """"renoise": the pushed clean estimate is re-noised to t and denoised once (one more denoiser call)"""

    def __post_init__(self):
        _finite_at_least("guidance.eta", self.eta, 0)
        _choice("guidance.schedule", self.schedule, GUIDANCE_SCHEDULES)
        _choice("guidance.placement", self.placement, PLACEMENTS)
        if not isinstance(self.tau, (int, float)) or not 0 <= self.tau <= 1:
            raise ValueError(f"guidance.tau must be in [0, 1] (0 never guides, 1 guides from the first step), got {self.tau!r}")
        if not isinstance(self.tau_stop, (int, float)) or not (self.tau_stop == 0 or 0 < self.tau_stop < self.tau):
            raise ValueError(f"guidance.tau_stop must be 0 or in (0, tau = {self.tau!r}): guidance runs while "
                             f"tau_stop < 1 - s/T <= tau, got {self.tau_stop!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"guidance.interval must be an integer >= 1, got {self.interval!r}")
        check_sketch(self.k, self.oversample, self.power_iters)
        for name in ("warm_start", "rescale_interval", "reuse_direction"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"guidance.{name} must be true or false, got {getattr(self, name)!r}")
        _choice("guidance.gradient", self.gradient, GRADIENTS)
        _choice("guidance.direction", self.direction, DIRECTIONS)
        if self.micro_batch is not None and (isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int)
                                             or self.micro_batch < 1):
            raise ValueError(f"guidance.micro_batch must be an integer >= 1 or null (the whole batch), got {self.micro_batch!r}")
        if self.rescale_interval and self.reuse_direction:
            raise ValueError("guidance.rescale_interval and guidance.reuse_direction both make up for the skipped steps: "
                             "choose one")
        _choice("guidance.project", self.project, PROJECTIONS)
        if self.project == "renoise" and self.placement != "posterior-mean":
            raise ValueError("guidance.project 'renoise' moves the clean estimate the posterior-mean push implies: "
                             "set guidance.placement: posterior-mean")

    def window(self, total: int) -> list[bool]:
        """Which of ``total`` steps (s = 0 the noisiest) lie in the guidance window tau_stop < 1 - s/T <= tau
        (docs/method.md, 'Deferral and interval'); none when eta is 0."""
        return deferral_window(self.tau, self.tau_stop, total) if self.eta != 0 else [False] * total

    def guided_steps(self, total: int) -> list[bool]:
        """Which steps run guidance: every interval-th step of the window, from its first."""
        window = self.window(total)
        first = window.index(True) if True in window else total
        return [ok and (s - first) % self.interval == 0 for s, ok in enumerate(window)]

    def pushed_steps(self, total: int) -> list[bool]:
        """Which steps move x by a guidance step: the guided ones, and with ``reuse_direction`` every step of the window."""
        return self.window(total) if self.reuse_direction else self.guided_steps(total)


@dataclass(frozen=True)
class BoostSkipConfig:
    """Boost-and-skip baseline: start from gamma-scaled noise and skip the first ``skip`` steps."""

    gamma: float = 1.1
    """initial-noise boost (> 1 pushes towards low-density regions)"""
    skip: int = 2
    """noisiest steps skipped"""

    def __post_init__(self):
        _finite_at_least("bns.gamma", self.gamma, 0)
        if isinstance(self.skip, bool) or not isinstance(self.skip, int) or self.skip < 0:
            raise ValueError(f"bns.skip must be an integer >= 0, got {self.skip!r}")


@dataclass(frozen=True)
class SgmsConfig:
    """Self-guided minority sampling (SGMS): push the posterior mean up the gradient of a minority score."""

    strength: float = 0.4
    """the push is strength * beta-tilde_t * g (g L-inf normalised); 0 never guides"""
    renoise: float = 0.8
    """the fixed re-noise level as a fraction of the model's training timesteps (the paper's 0.8 T)"""
    distance: str = "pixels"
    """"pixels": mean squared difference of the decoded images; "lpips": LPIPS (AlexNet) from sgms.lpips_weights"""
    lpips_weights: str | None = None
    """with distance lpips: a local folder of alexnet.pth (torchvision's AlexNet) and alex.pth (LPIPS v0.1 heads)"""
    tau: float = 0.8
    """deferral: guide step s of T only when 1 - s/T <= tau (0 never, 1 from the start)"""

    def __post_init__(self):
        _finite_at_least("sgms.strength", self.strength, 0)
        if isinstance(self.renoise, bool) or not isinstance(self.renoise, (int, float)) or not 0 < self.renoise <= 1:
            raise ValueError(f"sgms.renoise must be in (0, 1] (a fraction of the training timesteps), "
                             f"got {self.renoise!r}")
        _choice("sgms.distance", self.distance, SGMS_DISTANCES)
        if self.distance == "lpips" and not self.lpips_weights:
            raise ValueError("sgms.distance lpips reads local weights: set sgms.lpips_weights to a folder holding "
                             "alexnet.pth and alex.pth (docs/method.md, 'Self-guided minority sampling')")
        if self.distance != "lpips" and self.lpips_weights is not None:
            raise ValueError(f"sgms.lpips_weights is read only with sgms.distance lpips (distance is "
                             f"{self.distance!r}): drop it or set sgms.distance: lpips")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 <= self.tau <= 1:
            raise ValueError(f"sgms.tau must be in [0, 1] (0 never guides, 1 guides from the first step), "
                             f"got {self.tau!r}")

    def guided_steps(self, total: int) -> list[bool]:
        """Which of ``total`` steps run the minority guidance: the deferral window, none when strength is 0."""
        return deferral_window(self.tau, 0, total) if self.strength != 0 else [False] * total


@dataclass(frozen=True)
class MinorityPromptConfig:
    """MinorityPrompt: each prompt's appended placeholder embedding optimised to raise the reconstruction discrepancy."""

    iterations: int = 10
    """Adam iterations at each optimised step; 0 never optimises (the unguided sampler)"""
    lr: float = 0.01
    """Adam's learning rate on the placeholder embedding; 0 never optimises (the unguided sampler)"""
    t_lo: float = 0.9
    """optimise at the steps whose timestep t > t_lo * N (N training timesteps): 0.9 the noisiest tenth, 0 every step"""
    renoise: float = 0.75
    """the fixed re-noise level as a fraction of the model's training timesteps"""
    mirror_renoise: bool = False
    """re-noise to r = N - 1 - t_prev (mirrors the step's next level; the SDXL-Lightning setting) instead"""
    init_word: str | None = None
    """the placeholder starts as this single-token word's input embedding; None: the vocabulary's mean embedding"""

    def __post_init__(self):
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"minority_prompt.iterations must be an integer >= 0, got {self.iterations!r}")
        _finite_at_least("minority_prompt.lr", self.lr, 0)
        if isinstance(self.t_lo, bool) or not isinstance(self.t_lo, (int, float)) or not 0 <= self.t_lo < 1:
            raise ValueError(f"minority_prompt.t_lo must be in [0, 1) (0 optimises at every step), got {self.t_lo!r}")
        if isinstance(self.renoise, bool) or not isinstance(self.renoise, (int, float)) or not 0 < self.renoise <= 1:
            raise ValueError(f"minority_prompt.renoise must be in (0, 1] (a fraction of the training timesteps), "
                             f"got {self.renoise!r}")
        if not isinstance(self.mirror_renoise, bool):
            raise ValueError(f"minority_prompt.mirror_renoise must be true or false, got {self.mirror_renoise!r}")
        if self.init_word is not None and (not isinstance(self.init_word, str) or len(self.init_word.split()) != 1):
            raise ValueError(f"minority_prompt.init_word must be one word or null (the mean embedding), "
                             f"got {self.init_word!r}")

    def optimised_steps(self, timesteps: tuple[int, ...], train_steps: int) -> list[bool]:
        """Which sampled timesteps optimise the placeholder: t > t_lo * N; none when iterations or lr is 0."""
        if self.iterations == 0 or self.lr == 0:
            return [False] * len(timesteps)
        return [t > self.t_lo * train_steps for t in timesteps]


# The authors' published settings per model preset (docs/method.md, 'MinorityPrompt').
MINORITY_PROMPT_SETTINGS: dict[str, MinorityPromptConfig] = {
    "sd-1.5": MinorityPromptConfig(),  # their text-to-image script's defaults
    "sdxl-lightning-4step": MinorityPromptConfig(iterations=3, lr=0.001, t_lo=0.0, mirror_renoise=True,
                                                 init_word="cool"),  # their MS-COCO script
}


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: method, update rule, steps, conditioning strength, and each method's knobs."""

    method: str = "jepa"
    """unguided, bns, jepa, jepa-reference, sgms or minority-prompt"""
    sampler: str = "ddim"
    """"ddim" or "ddpm" (ancestral)"""
    steps: int = 50
    """sampling steps"""
    ddim_eta: float = 0.0
    """DDIM stochasticity (0 deterministic, 1 DDPM-like)"""
    cfg_scale: float = 1.0
    """classifier-free guidance scale: 1 = off, > 1 applies it (guidance.models.applies_cfg)"""
    timestep_spacing: str | None = None
    """None keeps the model's scheduler config; "trailing" for SDXL-Lightning"""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    bns: BoostSkipConfig = field(default_factory=BoostSkipConfig)
    sgms: SgmsConfig = field(default_factory=SgmsConfig)
    minority_prompt: MinorityPromptConfig = field(default_factory=MinorityPromptConfig)

    def __post_init__(self):
        _choice("method", self.method, tuple(METHODS))
        _choice("sampler", self.sampler, SAMPLERS)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        _finite_at_least("ddim_eta", self.ddim_eta, 0)
        if self.ddim_eta > 1:
            raise ValueError(f"ddim_eta must be in [0, 1] (0 deterministic, 1 DDPM-like; above 1 the DDIM noise outgrows 1 - abar_prev), got {self.ddim_eta!r}")
        _finite_at_least("cfg_scale", self.cfg_scale, 1, " (1 = off, > 1 applies classifier-free guidance)")
        if self.timestep_spacing is not None:
            _choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        check = METHODS[self.method].check
        if check is not None:
            check(self)

    @property
    def spec(self) -> MethodSpec:
        """The method's row of the table."""
        return METHODS[self.method]

    @property
    def objective(self) -> str | None:
        """The registered top-k objective the method guides with, or None when it needs no encoder gradient."""
        return self.spec.objective

    @property
    def guides(self) -> bool:
        """Whether the method moves samples by guidance steps (its rows may fall back to unguided)."""
        return self.spec.guides


def _check_jepa_reference(config: SamplingConfig) -> None:
    if config.guidance.warm_start:
        raise ValueError("guidance.warm_start needs method jepa: the authors' reference sketch starts fresh each step")


def _check_bns(config: SamplingConfig) -> None:
    if config.bns.skip >= config.steps:
        raise ValueError(f"bns.skip ({config.bns.skip}) must be smaller than steps ({config.steps})")


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table: where the method's class lives, and what the checks and pipeline read."""

    home: str  # "module:Class", a sampling.Method subclass imported on first use (method_class)
    objective: str | None = None  # the registered top-k objective it guides with (needs the encoder's gradient)
    guides: bool = False  # moves samples by guidance steps through model.guidance_decode (retry_unguided applies)
    sections: tuple[str, ...] = ()  # the SamplingConfig sections that change its samples (the run identity covers them)
    check: Callable[[SamplingConfig], None] | None = None  # light checks across sections (ValueError naming the key)
    families: tuple[str, ...] = ()  # the model families (presets.FAMILIES) it runs on; () for every family


METHODS: dict[str, MethodSpec] = {
    "unguided": MethodSpec("guidance.baselines:Unguided"),
    "bns": MethodSpec("guidance.baselines:BoostSkip", sections=("bns",), check=_check_bns),
    "jepa": MethodSpec("guidance.jepa_guidance:JepaGuided", objective="rsvd", guides=True, sections=("guidance",)),
    "jepa-reference": MethodSpec("guidance.jepa_guidance:JepaGuided", objective="reference", guides=True,
                                 sections=("guidance",), check=_check_jepa_reference),
    "sgms": MethodSpec("guidance.sgms:SelfGuided", guides=True, sections=("sgms",)),
    "minority-prompt": MethodSpec("guidance.minority_prompt:MinorityPrompt", sections=("minority_prompt",),
                                  families=("sd", "sdxl")),
}


def lpips_folder(config: SamplingConfig) -> str | None:
    """The LPIPS weights folder a run reads (method sgms with distance lpips), else None."""
    return config.sgms.lpips_weights if config.method == "sgms" and config.sgms.distance == "lpips" else None


def method_class(name: str) -> type:
    """The ``sampling.Method`` subclass that runs method ``name``, imported now (torch loads here, not before)."""
    module, _, attribute = METHODS[name].home.partition(":")
    return getattr(importlib.import_module(module), attribute)
