"""``genframe finetune finetune=subject``: teach a text-to-image model a subject from a
few images bound to a rare token, with prior preservation (DreamBooth, Ruiz et al. 2023).

This module prepares the model and the subject data (checking the token, making the class
images with the model before tuning); `genframe.tasks.finetune` trains them as any
fine-tuning, with all weights or LoRA adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError, valid_list
from genframe.tasks.build import build_data, check_fit, to_plain


def subject_model_and_data(cfg: DictConfig):
    """The model of ``cfg.run``/``cfg.ckpt`` and the subject data of a
    ``finetune=subject`` config, the class images made and handed to it.

    Order: load the model; refuse a model without captions; read the base run's training
    captions (to check the token and class word, and for the class prompts); check
    the token (`genframe.data.subject.check_token`); build the data at the model's image
    size and channels; generate the class images with the model as it is, before any
    change, write them to ``<run dir>/class_images/`` and hand them to the data; read
    the subject's images.

    Returns:
        (model, run or None, weights path, data module, plain data config, what run.json
        records under ``subject``).
    """
    from genframe.data.subject import check_token, class_prompts_from
    from genframe.weights import load_model

    model, run, weights = load_model(cfg.get("run"), cfg.get("ckpt"))
    name = model.registered_name
    if "prompt" not in getattr(model, "condition_keys", ()) or "caption" not in getattr(model, "needs", ()):
        raise UserError(
            f"finetune=subject binds a subject to a word of the captions, but model '{name}' reads "
            f"no captions (it needs {valid_list(getattr(model, 'needs', ()))}); start from a "
            "text-to-image run (model=text2image), or fine-tune this model with finetune=data")
    if getattr(model, "tokenizer", None) is None:
        raise UserError(f"model '{name}' has no tokenizer to read the token with; start from a run "
                        "trained on captioned data")
    data_cfg = to_plain(cfg.data)
    hp = model.hparams
    for key, arg in (("image_size", "image_size"), ("channels", "in_channels")):
        if data_cfg.get(key) is None and arg in hp:
            data_cfg[key] = int(hp[arg])
    captions = _base_captions(run)
    token, class_word = cfg.get("token"), cfg.get("class_word")
    found = check_token(token, class_word, model.tokenizer, captions,
                        data_cfg.get("instance_prompt") or "a {token} {class_word}")
    data = build_data(data_cfg)
    data.use_tokenizer(model.tokenizer)
    check_fit(model, data, data_cfg)
    data.load_subject()  # a folder with no readable image is refused before any generation
    record: dict[str, Any] = {"token": token, "class_word": class_word, **found,
                              "prior_preservation": bool(cfg.prior_preservation)}
    if cfg.prior_preservation:
        given = to_plain(cfg.get("class_prompts"))
        count = int(cfg.num_class_images)
        prompts = ([given[i % len(given)] for i in range(count)] if given
                   else class_prompts_from(captions, class_word, count, seed=int(cfg.seed)))
        try:
            samples = class_images(model, prompts, seed=int(cfg.seed),
                                   guidance=cfg.get("class_guidance"),
                                   steps=cfg.get("class_sampler_steps"))
        except UserError as exc:  # name the keys the user set, not the sampler's own
            raise UserError(f"class images (class_sampler_steps={cfg.get('class_sampler_steps')}, "
                            f"class_guidance={cfg.get('class_guidance')}): {exc}") from exc
        from genframe.sample_writer import write_samples

        folder = write_samples(samples, folder=Path(cfg.paths.output_dir) / "class_images")
        import torch

        data.set_class_images(torch.cat([s.images for s in samples]), prompts)
        record.update(class_images_dir=str(folder), class_prompts=sorted(set(prompts)),
                      class_prompts_from=("class_prompts" if given else
                                          "the base run's captions" if captions else f"'a {class_word}'"))
    data.setup("fit")
    record.update(data.summary())
    return model, run, weights, data, data_cfg, record


def _base_captions(run) -> list[str] | None:
    """The training captions of the run a model was trained on, or None (a bare
    checkpoint, data without captions, data no longer there)."""
    import logging

    from genframe.data.base import split_captions

    if run is None or not run.data_config:
        return None
    try:
        base = build_data(run.data_config)
        if "caption" not in getattr(base, "provides", ()):
            return None
        base.setup("fit")
        return split_captions(base, "train")
    except UserError as exc:
        logging.getLogger("genframe").warning(
            "finetune=subject: cannot read the base run's captions (%s); the token and class word "
            "are checked against the tokenizer only", str(exc).splitlines()[0])
        return None


def class_images(model, prompts: list[str], *, seed: int, guidance: float | None = None,
                 steps: int | None = None, batch_size: int = 64):
    """Images of the class for prior preservation, made by `model` as it is (before
    tuning): one per prompt, in batches of `batch_size`, batch b seeded ``seed + b``.

    Args:
        model: a text-to-image model.
        prompts: one prompt per image.
        seed: the first batch's seed.
        guidance: the guidance scale (None: the model's default).
        steps: DDIM steps (None: the model's default sampler).

    Returns:
        a list of `Samples` (images (n, C, H, W) in [0, 1] with their prompts).
    """
    import time

    from genframe.tasks.build import build_sampler

    options: dict[str, Any] = {}
    if steps is not None:
        options["sampler"] = build_sampler({"name": "ddim", "steps": int(steps)})
    if guidance is not None:
        options["guidance"] = float(guidance)
    distinct = len(set(prompts))
    print(f"prior preservation: {len(prompts)} class images from {distinct} "
          f"prompt{'s' if distinct != 1 else ''} (e.g. '{prompts[0]}'), made by the model "
          "before tuning ...", flush=True)
    start = time.perf_counter()
    batches = [model.generate(len(prompts[b:b + batch_size]), condition={"prompt": prompts[b:b + batch_size]},
                              seed=seed + b, **options)
               for b in range(0, len(prompts), batch_size)]
    print(f"prior preservation: {len(prompts)} class images in {time.perf_counter() - start:.0f} s",
          flush=True)
    return batches
