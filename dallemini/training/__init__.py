"""Training: DalleBart, VQGAN and small-CLIP trainers, schedules, resumable state, distributed setup."""
