"""MinorityPrompt (Um and Ye, CVPR 2025, "Minority-Focused Text-to-Image Generation via Prompt Optimization") as a
sampling method: method ``minority-prompt`` (docs/method.md, 'MinorityPrompt').

Each prompt gets a placeholder token appended (the carrier ``*``); its input embedding e, one per row and text
encoder, replaces the carrier's at the text encoders' input. At an optimised step (t, t_prev), per row, with e
requiring grad and x_t fixed:
  c        = text_encoders(prompt + placeholder e)                  through the pipeline's encode_prompt
  x0_hat   = Tweedie(eps(x_t, t | c), x_t)                           conditional only (no CFG)
  x_r      = sqrt(abar_r) x0_hat + sqrt(1 - abar_r) z               re-noised to r (z: the row's stream)
  x0_tilde = Tweedie(eps(x_r, r | c_base), x_r)                      denoised back under the plain prompt
  L        = || x0_hat - x0_tilde ||_2                               the latent reconstruction discrepancy
  e       <- Adam step up L, ``iterations`` times (a fresh Adam at each optimised step)
then the step runs the sampler's update under c (with CFG as configured). Later steps keep the last c; steps
before the first optimised one, and every step when nothing is optimised, are the unguided sampler's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from guidance.models import Denoiser, PromptEmbeds, StableDiffusion, applies_cfg
from guidance.sampling import Method, Sampler, stream_seed
from guidance.schedules import NoiseSchedule, predict_clean, renoise, renoise_timestep

if TYPE_CHECKING:
    from guidance.encoders import JepaEncoder
    from guidance.methods import MinorityPromptConfig, SamplingConfig
    from guidance.models import DiffusionModel, WorkItem

RENOISE_STREAM = "minority-prompt-renoise"  # the name of each row's re-noise stream (sampling.stream_seed)
CARRIER = "*"  # the token appended to each prompt; the placeholder embedding replaces its input embedding


def discrepancy(conditioned: Denoiser, plain: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, t: int, r: int,
                noise: torch.Tensor) -> torch.Tensor:
    """L per row: the L2 distance between the clean estimate of x_t under ``conditioned`` and its copy re-noised to
    r (with ``noise``) and denoised once under ``plain``, in latents; differentiable in the conditioning."""
    x0_hat, _ = predict_clean(schedule, conditioned(x, t), x, t)
    x_r = renoise(schedule, x0_hat, r, noise)
    x0_tilde, _ = predict_clean(schedule, plain(x_r, r), x_r, r)
    return (x0_hat - x0_tilde).flatten(1).norm(dim=1)


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of the pipeline and where its placeholder sits in each row's tokens."""

    encoder: nn.Module
    positions: torch.Tensor  # (B,) the carrier's token index per row

    def initial(self, tokenizer, init_word: str | None, rows: int) -> torch.Tensor:
        """(rows, D) fp32: the init word's input embedding, or the vocabulary's mean one."""
        table = self.encoder.get_input_embeddings().weight.detach().float()
        if init_word is None:
            return table.mean(0).repeat(rows, 1)
        return table[single_token(tokenizer, init_word)].repeat(rows, 1)

    @contextmanager
    def placed(self, embedding: torch.Tensor) -> Iterator[None]:
        """While open, each row's carrier token enters the encoder as ``embedding`` (B, D)."""

        def place(module, inputs, output):
            output = output.clone()
            output[torch.arange(len(output), device=output.device), self.positions] = embedding.to(output.dtype)
            return output

        hook = self.encoder.get_input_embeddings().register_forward_hook(place)
        try:
            yield
        finally:
            hook.remove()


def single_token(tokenizer, word: str) -> int:
    """The token id of ``word``, refused unless the tokenizer reads it as one token."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"minority_prompt.init_word {word!r} is {len(ids)} tokens for this model's tokenizer: "
                         "choose a single-token word, or null for the mean embedding")
    return ids[0]


def carrier_positions(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(B,) where the carrier lands in each prompt's tokens (the plain prompt's end token), refused when the
    prompt leaves it no room in the tokenizer's context."""
    positions = []
    for prompt in prompts:
        plain = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
        carried = tokenizer(f"{prompt} {CARRIER}", truncation=True, max_length=tokenizer.model_max_length).input_ids
        if len(carried) != len(plain) + 1:
            raise ValueError(f"the prompt {prompt[:40]!r}... fills the text encoder's {tokenizer.model_max_length} "
                             "tokens: minority-prompt needs one more for its placeholder; shorten the prompt")
        positions.append(len(plain) - 1)
    return torch.tensor(positions)


def text_encoders(model: StableDiffusion) -> list[tuple[object, nn.Module]]:
    """(tokenizer, text encoder) pairs of the pipeline: one for SD 1.x / 2.x, two for SDXL."""
    pipeline = model.pipeline
    pairs = [(pipeline.tokenizer, pipeline.text_encoder)]
    if model.xl:
        pairs.append((pipeline.tokenizer_2, pipeline.text_encoder_2))
    return pairs


class MinorityPrompt(Method):
    """Method ``minority-prompt``: each row's placeholder embedding is optimised at the noisiest steps to raise the
    latent reconstruction discrepancy, and the step runs under the prompt it completes."""

    def __init__(self, config: MinorityPromptConfig, model: StableDiffusion, prompts: Sequence[str], cfg_scale: float,
                 renoise_generators: Sequence[torch.Generator]):
        self.config, self.model, self.cfg_scale = config, model, cfg_scale
        self.carried = [f"{prompt} {CARRIER}" for prompt in prompts]
        self.renoise_generators = renoise_generators
        self.encoders, self.embeddings = [], []
        for tokenizer, encoder in text_encoders(model):
            placed = TextEncoder(encoder, carrier_positions(tokenizer, prompts).to(model.device))
            self.encoders.append(placed)
            self.embeddings.append(placed.initial(tokenizer, config.init_word, len(prompts)))
        with torch.no_grad():
            self.base = model.encode_prompts(prompts, applies_cfg(cfg_scale))

    @classmethod
    def check_work(cls, config: SamplingConfig, model: DiffusionModel, encoder: JepaEncoder | None) -> None:
        if not isinstance(model, StableDiffusion):
            raise ValueError(f"method minority-prompt optimises a prompt embedding: it needs a text-to-image model "
                             f"(sd, sdxl), not a {model.family} model")
        if config.minority_prompt.init_word is not None:
            for tokenizer, _ in text_encoders(model):
                single_token(tokenizer, config.minority_prompt.init_word)

    @classmethod
    def build(cls, config: SamplingConfig, model: DiffusionModel, items: Sequence[WorkItem],
              encoder: JepaEncoder | None) -> MinorityPrompt:
        return cls(config.minority_prompt, model, [item.prompt for item in items], config.cfg_scale,
                   [torch.Generator().manual_seed(stream_seed(RENOISE_STREAM, item.seed)) for item in items])

    def start(self, x: torch.Tensor, schedule: NoiseSchedule) -> tuple[torch.Tensor, NoiseSchedule]:
        self.optimised = self.config.optimised_steps(schedule.timesteps, len(schedule.alphas_cumprod))
        self.steps_guided, self.prompts = 0, None
        return x, schedule

    def encode(self, embeddings: Sequence[torch.Tensor]) -> PromptEmbeds:
        """The carried prompts' embeddings with each encoder's placeholder set to ``embeddings`` (no negatives)."""
        with ExitStack() as stack:
            for encoder, embedding in zip(self.encoders, embeddings):
                stack.enter_context(encoder.placed(embedding))
            return self.model.encode_prompts(self.carried, cfg=False)

    def renoise_level(self, schedule: NoiseSchedule, t_prev: int) -> int:
        """r: the fixed level, or with ``mirror_renoise`` N - 1 - t_prev (at most the last training timestep)."""
        if not self.config.mirror_renoise:
            return renoise_timestep(schedule, self.config.renoise)
        count = len(schedule.alphas_cumprod)
        return min(count - 1 - t_prev, count - 1)

    def optimise(self, sampler: Sampler, x: torch.Tensor, t: int, t_prev: int) -> PromptEmbeds:
        """Adam on each row's placeholder embedding, up the discrepancy at x_t; the prompts it leaves (detached)."""
        r = self.renoise_level(sampler.schedule, t_prev)
        plain = self.model.conditioned(self.base, 1.0)
        embeddings = [e.detach().clone().requires_grad_(True) for e in self.embeddings]
        adam = torch.optim.Adam(embeddings, lr=self.config.lr)
        with torch.enable_grad():
            for _ in range(self.config.iterations):
                noise = randn_tensor(x.shape, generator=list(self.renoise_generators), device=x.device, dtype=x.dtype)
                loss = discrepancy(self.model.conditioned(self.encode(embeddings), 1.0), plain, sampler.schedule,
                                   x.detach(), t, r, noise)
                adam.zero_grad()
                (-loss.sum()).backward()  # rows are independent: each row's loss reaches only its own embedding
                adam.step()
        self.embeddings = [e.detach() for e in embeddings]
        with torch.no_grad():
            prompts = self.encode(self.embeddings)
        return replace(self.base, embeds=prompts.embeds, pooled=prompts.pooled)

    def step(self, sampler: Sampler, s: int, x: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        if self.optimised[s]:
            self.prompts = self.optimise(sampler, x, t, t_prev)
            self.steps_guided += 1
        if self.prompts is None:
            return sampler.update(x, t, t_prev)
        with torch.no_grad():
            model_output = self.model.conditioned(self.prompts, self.cfg_scale)(x, t)
        return sampler.update(x, t, t_prev, model_output)
