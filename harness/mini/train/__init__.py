"""Train the embedded `mini-sd` model on the procedural shape world, offline, on CPU.

Stages (each resumable, each deterministic from --seed):
  clip      mini-CLIP: image + text towers, contrastive (soft targets for repeated captions);
            its text tower conditions the UNet and is the pipeline's text encoder
  vae       mini-VAE: AutoencoderKL 32x32x3 -> 8x8x4, MSE + tiny KL; its scaling factor is
            1 / std of the latents it produces
  unet      mini-UNet: UNet2DConditionModel on VAE latents, text from the frozen mini-CLIP text
            tower, 10% empty captions (classifier-free guidance), SD's DDPM betas, epsilon
            objective, EMA weights
  clip-tune the scoring mini-CLIP: phase 1 fine-tuned against all training captions (hard
            negatives); it scores images (CLIP score, Frechet features, zero-shot concepts)
  assemble  the StableDiffusionPipeline folder (harness/mini/assets/mini-sd) and the whole CLIPModel
            for scoring (harness/mini/assets/mini-clip), safetensors only
  all       the four in order; a stage whose result exists is skipped (--force redoes it)

Checkpoints (safetensors + a JSON state) go to --work every few minutes, so a killed run
resumes where it stopped when started again with the same arguments.

    diffbench train-mini --stage all --threads 2 > train_mini.log 2>&1 &
"""
