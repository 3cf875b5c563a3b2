"""The embedded default: a small Stable-Diffusion-1.5-architecture model that
the project builds and trains itself, so that everything runs offline."""
