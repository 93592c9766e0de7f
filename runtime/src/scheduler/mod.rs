//! Diffusion schedulers (in progress).
